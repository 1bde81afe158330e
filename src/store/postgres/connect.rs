//! Where and how the store connects: a connection string's settings, its
//! `sslmode` read as libpq reads it, and the TLS connector that mode needs.

use deadpool_postgres::{Manager, ManagerConfig};
use tokio_postgres::NoTls;

use super::listen::Connector;
use crate::store::StoreError;
#[cfg(feature = "tls")]
use crate::store::tls::TlsSettings;

/// Whether and how a connection uses TLS: libpq's `sslmode` values.
///
/// With the `tls` feature, every TLS connection checks the server's
/// certificate against the trusted roots (Mozilla's, or the bundle given
/// with [`ConnectOptions::tls_ca_file`]); a certificate that does not
/// verify fails the connection, never falls back to plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, plaintext when it does not (the
    /// default, as in libpq). A server that offers TLS with a certificate
    /// that does not verify is an error, not a reason to go plaintext.
    /// Without the `tls` feature, always plaintext.
    Prefer,
    /// TLS only; the certificate's chain **and** host name are checked
    /// (libpq's `require` checks neither: rustls always verifies).
    Require,
    /// TLS only; the chain is checked, the host name is not.
    VerifyCa,
    /// TLS only; the chain and the host name are checked.
    VerifyFull,
}

impl SslMode {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it knows the first three only, and
    /// leaves checking the certificate to the connector.
    fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            Self::Disable => tokio_postgres::config::SslMode::Disable,
            Self::Prefer => tokio_postgres::config::SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    fn from_tokio_postgres(mode: tokio_postgres::config::SslMode) -> Self {
        match mode {
            tokio_postgres::config::SslMode::Disable => Self::Disable,
            tokio_postgres::config::SslMode::Prefer => Self::Prefer,
            // `Require`, and any mode a later tokio-postgres adds: the
            // strictest reading.
            _ => Self::Require,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach PostgreSQL: a connection string's settings with its
/// `sslmode` read as libpq reads it (`verify-ca` and `verify-full`
/// included, which tokio-postgres alone refuses), and the TLS settings that
/// go with it (feature `tls`).
///
/// [`PostgresStore::builder`](super::PostgresStore::builder) makes one from
/// its URL. Make one yourself to give your own pool the same connections,
/// and hand it to
/// [`PostgresStoreBuilder::notifications`](super::PostgresStoreBuilder::notifications)
/// for the store's `LISTEN` connection:
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
/// use tower_idempotency::store::PostgresStore;
/// use tower_idempotency::store::postgres::ConnectOptions;
///
/// let options = ConnectOptions::from_url(
///     "postgres://app@db.internal:5432/app?sslmode=verify-full",
/// )?;
/// # #[cfg(feature = "tls")]
/// let options = options.tls_ca_file("/etc/ssl/private-ca.pem");
/// let manager = options.manager(ManagerConfig {
///     recycling_method: RecyclingMethod::Fast,
/// })?;
/// let pool = Pool::builder(manager).max_size(32).build()?;
/// let store = PostgresStore::builder_for_pool(pool, None)
///     .notifications(options)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ConnectOptions {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    #[cfg(feature = "tls")]
    tls: TlsSettings,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's `Config` redacts the password.
        let mut out = f.debug_struct("ConnectOptions");
        out.field("config", &self.config)
            .field("ssl_mode", &self.ssl_mode);
        #[cfg(feature = "tls")]
        out.field("tls", &self.tls);
        out.finish()
    }
}

impl ConnectOptions {
    /// Reads a `postgres://` URL or a `key=value` connection string.
    ///
    /// `sslmode` takes libpq's `disable`, `prefer` (the default),
    /// `require`, `verify-ca` and `verify-full` (see [`SslMode`]). Without
    /// the `tls` feature, the three that need TLS are refused here rather
    /// than failing every connection later.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let (url, mode) = take_ssl_mode(url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| super::configure_error(crate::store::error_chain(&e)))?;
        let ssl_mode = match mode {
            Some(mode) => mode,
            None => SslMode::from_tokio_postgres(config.get_ssl_mode()),
        };
        config.ssl_mode(ssl_mode.for_tokio_postgres());
        Self::with_mode(config, ssl_mode)
    }

    /// Takes tokio-postgres's own settings; its `SslMode::Require` is read
    /// as [`SslMode::Require`] (chain and host name checked).
    pub fn from_config(config: tokio_postgres::Config) -> Result<Self, StoreError> {
        let ssl_mode = SslMode::from_tokio_postgres(config.get_ssl_mode());
        Self::with_mode(config, ssl_mode)
    }

    fn with_mode(config: tokio_postgres::Config, ssl_mode: SslMode) -> Result<Self, StoreError> {
        #[cfg(not(feature = "tls"))]
        if !matches!(ssl_mode, SslMode::Disable | SslMode::Prefer) {
            return Err(super::configure_error(format!(
                "sslmode={ssl_mode} needs TLS: enable tower-idempotency's `tls` feature"
            )));
        }
        Ok(Self {
            config,
            ssl_mode,
            #[cfg(feature = "tls")]
            tls: TlsSettings::default(),
        })
    }

    /// The connection settings, `sslmode` as tokio-postgres knows it
    /// (`verify-ca` and `verify-full` show as `Require`).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The connection settings, to change (an application name, a connect
    /// timeout). Their `sslmode` is not read again: connections use
    /// [`ssl_mode`](Self::ssl_mode) whatever this config says, so TLS
    /// cannot be turned off here by mistake.
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Whether and how connections use TLS.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    crate::store::tls_setters!("connections whose `sslmode` asks for TLS");

    /// Replaces the TLS settings (a store builder's own, set after the
    /// options were made).
    #[cfg(feature = "tls")]
    pub(super) fn set_tls(&mut self, tls: TlsSettings) {
        self.tls = tls;
    }

    /// A deadpool manager that connects with these settings and the TLS
    /// they ask for. Fails when the CA bundle cannot be read or holds no
    /// certificate, or the client identity is malformed.
    pub fn manager(&self, manager_config: ManagerConfig) -> Result<Manager, StoreError> {
        let config = self.tokio_config();
        Ok(match self.connector()? {
            Connector::Plain => Manager::from_config(config, NoTls, manager_config),
            #[cfg(feature = "tls")]
            Connector::Rustls(tls) => Manager::from_config(config, tls, manager_config),
        })
    }

    /// The settings tokio-postgres connects with: the config, its `sslmode`
    /// the one these options read.
    pub(super) fn tokio_config(&self) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        config.ssl_mode(self.ssl_mode.for_tokio_postgres());
        config
    }

    /// The connector these settings need.
    pub(super) fn connector(&self) -> Result<Connector, StoreError> {
        #[cfg(feature = "tls")]
        if self.ssl_mode != SslMode::Disable {
            let names = self.ssl_mode != SslMode::VerifyCa;
            return Ok(Connector::Rustls(super::tls::connector(&self.tls, names)?));
        }
        Ok(Connector::Plain)
    }
}

/// Replaces each `sslmode` value tokio-postgres cannot read (`verify-ca`,
/// `verify-full`) with `require`. The mode is the last `sslmode` given, as
/// in libpq: returned when it is one of those two, `None` when it is a
/// value tokio-postgres reads itself (its error, if any, then names it).
fn take_ssl_mode(url: &str) -> (std::borrow::Cow<'_, str>, Option<SslMode>) {
    let spans = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url_ssl_modes(url)
    } else {
        key_value_ssl_modes(url)
    };
    let is_verify = |span: &Span| {
        matches!(
            SslMode::from_name(&url[span.clone()]),
            Some(SslMode::VerifyCa | SslMode::VerifyFull)
        )
    };
    if !spans.iter().any(is_verify) {
        return (url.into(), None);
    }
    let mode = spans
        .last()
        .and_then(|last| SslMode::from_name(&url[last.clone()]))
        .filter(|mode| matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull));
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for span in spans.iter().filter(|span| is_verify(span)) {
        out.push_str(&url[at..span.start]);
        out.push_str("require");
        at = span.end;
    }
    out.push_str(&url[at..]);
    (out.into(), mode)
}

type Span = std::ops::Range<usize>;

/// The byte ranges of every `sslmode` value in a URL's query: after the
/// first `?` that follows the credentials (which end at the first `@`, as
/// tokio-postgres reads them; a password may hold a `?`).
fn url_ssl_modes(url: &str) -> Vec<Span> {
    let after_credentials = url.find('@').map_or(0, |at| at.saturating_add(1));
    let Some(query_start) = url[after_credentials..]
        .find('?')
        .map(|i| after_credentials.saturating_add(i).saturating_add(1))
    else {
        return Vec::new();
    };
    let mut spans = Vec::new();
    let mut at = query_start;
    for pair in url[query_start..].split('&') {
        if let Some((key, value)) = pair.split_once('=')
            && key == "sslmode"
        {
            let start = at.saturating_add(key.len()).saturating_add(1);
            spans.push(start..start.saturating_add(value.len()));
        }
        at = at.saturating_add(pair.len()).saturating_add(1);
    }
    spans
}

/// The byte ranges of every unquoted `sslmode` value in a `key=value`
/// string (a quoted or escaped one is left to tokio-postgres, which reads
/// libpq's three values and refuses the rest by name).
fn key_value_ssl_modes(s: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    while i < bytes.len() {
        i = skip_ws(i);
        let key_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_ws(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            break;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'\'') {
            // Quoted: skip to the closing quote, honouring escapes.
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = i.saturating_add(1).min(bytes.len());
            continue;
        }
        let mut escaped = false;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
            escaped |= bytes[i] == b'\\';
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        let i_end = i.min(bytes.len());
        if key == "sslmode" && !escaped {
            spans.push(value_start..i_end);
        }
        i = i_end;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_are_read_from_urls_and_key_value_strings() {
        for (given, expected, rest) in [
            (
                "postgres://u@h/db?sslmode=verify-full",
                Some(SslMode::VerifyFull),
                "postgres://u@h/db?sslmode=require",
            ),
            (
                "postgresql://u@h/db?application_name=a&sslmode=verify-ca&connect_timeout=3",
                Some(SslMode::VerifyCa),
                "postgresql://u@h/db?application_name=a&sslmode=require&connect_timeout=3",
            ),
            (
                "postgres://u@h/db?sslmode=verify-full&sslmode=disable",
                None,
                "postgres://u@h/db?sslmode=require&sslmode=disable",
            ),
            (
                "host=h user=u sslmode = verify-full dbname=db",
                Some(SslMode::VerifyFull),
                "host=h user=u sslmode = require dbname=db",
            ),
            (
                "host=h password='a b sslmode=verify-ca' sslmode=prefer",
                None,
                "host=h password='a b sslmode=verify-ca' sslmode=prefer",
            ),
            ("postgres://u@h/db", None, "postgres://u@h/db"),
            (
                "postgres://u:p?sslmode=verify-ca@h/db?sslmode=verify-full",
                Some(SslMode::VerifyFull),
                "postgres://u:p?sslmode=verify-ca@h/db?sslmode=require",
            ),
            ("", None, ""),
            ("sslmode=", None, "sslmode="),
            ("host='unterminated", None, "host='unterminated"),
            ("a=\\", None, "a=\\"),
        ] {
            let (out, mode) = take_ssl_mode(given);
            assert_eq!((out.as_ref(), mode), (rest, expected), "{given}");
        }
    }

    proptest::proptest! {
        /// Any connection string is read without a panic (byte ranges stay
        /// on character boundaries), and a string without a `verify-*`
        /// value comes back unchanged.
        #[test]
        fn any_connection_string_is_read_without_panicking(
            s in "(sslmode|verify-full|verify-ca|postgres://|[=?&' \\\\é]|[a-z]){0,24}"
        ) {
            let (out, mode) = take_ssl_mode(&s);
            if !s.contains("verify-") {
                proptest::prop_assert_eq!(out.as_ref(), s.as_str());
                proptest::prop_assert_eq!(mode, None);
            }
        }
    }

    #[test]
    fn the_mode_is_kept_beside_what_tokio_postgres_reads() {
        let options = ConnectOptions::from_url("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(options.ssl_mode(), SslMode::Disable);
        let options = ConnectOptions::from_url("postgres://u@h/db").unwrap();
        assert_eq!(options.ssl_mode(), SslMode::Prefer);
        let e = ConnectOptions::from_url("postgres://u@h/db?sslmode=allow").unwrap_err();
        assert!(format!("{e:#}").contains("sslmode"), "{e:#}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn verify_full_asks_tokio_postgres_for_tls_whatever_config_mut_did() {
        let mut options =
            ConnectOptions::from_url("postgres://u@h/db?sslmode=verify-full").unwrap();
        assert_eq!(options.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(
            options.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        options
            .config_mut()
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        assert_eq!(
            options.tokio_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn modes_that_need_tls_are_refused_without_the_feature() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let e =
                ConnectOptions::from_url(&format!("postgres://u@h/db?sslmode={mode}")).unwrap_err();
            assert!(format!("{e:#}").contains("`tls` feature"), "{e:#}");
        }
    }
}
