//! TLS to PostgreSQL, as libpq's URL parameters ask for it: `sslmode`
//! (`disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `sslrootcert`, `sslcert` and `sslkey`. tokio-postgres knows only
//! `disable`, `prefer` and `require`, and no certificate files: those
//! parameters are taken out of the URL here, and a connector is built from
//! them.
//!
//! As with libpq: `prefer` (the default) encrypts when the server offers it;
//! `require` encrypts, and checks the server's certificate against
//! `sslrootcert` only when one is given; `verify-ca` checks the certificate
//! chain against `sslrootcert` (refused without one); `verify-full` checks the
//! host name too, against `sslrootcert` or the system's trusted roots. `sslrootcert=system` trusts the system's roots
//! and, as with libpq, implies `verify-full` (a weaker `sslmode` is refused:
//! any public authority's certificate for any name would pass it). `sslcert`
//! and `sslkey` give a client certificate.

use anyhow::{bail, Context};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::MakeTlsConnector;

/// What every ordercast connection is opened with.
pub type Tls = MakeTlsConnector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS parameters of a connection string, and the string without them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Split {
    /// What tokio-postgres reads: the rest, and `sslmode` as it knows it.
    pub rest: String,
    mode: Mode,
    /// `sslmode` as given (else `mode` is the default).
    mode_given: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// `sslrootcert=system`: the system's trusted roots (libpq 16).
const SYSTEM: &str = "system";

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits the TLS parameters off a URL (`postgres://...?sslmode=...`) or a
/// key-value string (`host=db sslmode=...`).
pub(crate) fn split(conn: &str) -> anyhow::Result<Split> {
    let mut split = Split::default();
    let mut take = |key: &str, value: String| -> anyhow::Result<()> {
        match key {
            "sslmode" => {
                split.mode = match value.as_str() {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        bail!("sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")
                    }
                };
                split.mode_given = Some(value);
            }
            "sslrootcert" => split.root_cert = Some(value),
            "sslcert" => split.cert = Some(value),
            _ => split.key = Some(value),
        }
        Ok(())
    };
    let mut kept: Vec<String> = Vec::new();
    let url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let base = if url {
        let (base, query) = conn.split_once('?').unwrap_or((conn, ""));
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_KEYS.contains(&k) {
                let v = percent_encoding::percent_decode_str(v).decode_utf8().context("a TLS parameter")?;
                take(k, v.into_owned())?;
            } else {
                kept.push(pair.to_string());
            }
        }
        base.to_string()
    } else {
        // Read whole, as libpq reads it (quoted values, spaces around `=`),
        // and written back with the TLS settings taken out.
        let mut rest = Vec::new();
        for (k, v) in super::key_values(conn)? {
            if TLS_KEYS.contains(&k.as_str()) {
                take(&k, v)?;
            } else {
                rest.push(format!("{k}={}", super::conn_value(&v)));
            }
        }
        rest.join(" ")
    };
    if split.root_cert.as_deref() == Some(SYSTEM) {
        match (split.mode, &split.mode_given) {
            (Mode::VerifyFull, _) => {}
            (_, None) => split.mode = Mode::VerifyFull,
            (_, Some(weak)) => bail!(
                "sslmode {weak:?} may not be used with sslrootcert=system (use verify-full): the system's \
                 roots trust any public authority's certificate, for any name"
            ),
        }
    }
    // As libpq, which refuses it without a root file: the system's roots
    // with no host name checked would pass any public authority's
    // certificate, for any name.
    if split.mode == Mode::VerifyCa && split.root_cert.is_none() {
        bail!(
            "sslmode=verify-ca needs sslrootcert naming the authority's certificates (a PEM file): without one, \
             any certificate a public authority signed, for any name, would pass; use verify-full to check the \
             server against the system's trusted roots"
        );
    }
    let mode = match split.mode {
        Mode::Disable => "disable",
        Mode::Prefer => "prefer",
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => "require",
    };
    split.rest = if url {
        kept.push(format!("sslmode={mode}"));
        format!("{base}?{}", kept.join("&"))
    } else {
        format!("{base} sslmode={mode}")
    };
    Ok(split)
}

impl Split {
    /// The connector for these parameters.
    pub(crate) fn connector(&self) -> anyhow::Result<Tls> {
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        let verify = match self.mode {
            Mode::VerifyCa | Mode::VerifyFull => true,
            Mode::Require => self.root_cert.is_some(),
            Mode::Disable | Mode::Prefer => false,
        };
        // The builder has loaded the system's roots: `system` keeps them.
        if let Some(root) = self.root_cert.as_deref().filter(|r| *r != SYSTEM) {
            // Its certificates alone, as libpq trusts them: not added to the
            // system's trusted roots (which the builder has loaded), or any
            // public authority's certificate would pass `verify-ca`.
            let pem = std::fs::read(root).with_context(|| format!("sslrootcert {root:?} could not be read"))?;
            let certs = X509::stack_from_pem(&pem).with_context(|| format!("sslrootcert {root:?} is not PEM"))?;
            anyhow::ensure!(!certs.is_empty(), "sslrootcert {root:?} holds no certificate");
            let mut store = X509StoreBuilder::new()?;
            for cert in certs {
                store.add_cert(cert)?;
            }
            builder.set_cert_store(store.build());
        }
        builder.set_verify(if verify { SslVerifyMode::PEER } else { SslVerifyMode::NONE });
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                builder
                    .set_certificate_chain_file(cert)
                    .with_context(|| format!("sslcert {cert:?} could not be read"))?;
                builder
                    .set_private_key_file(key, SslFiletype::PEM)
                    .with_context(|| format!("sslkey {key:?} could not be read"))?;
            }
            (None, None) => {}
            _ => bail!("sslcert and sslkey go together"),
        }
        let mut tls = MakeTlsConnector::new(builder.build());
        if self.mode != Mode::VerifyFull {
            tls.set_callback(|config, _| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_sslmode_put_as_tokio_postgres_knows_it() {
        let s =
            split("postgres://u@db:5432/orders?application_name=x&sslmode=verify-full&sslrootcert=%2Fca.crt").unwrap();
        assert_eq!(s.rest, "postgres://u@db:5432/orders?application_name=x&sslmode=require");
        assert_eq!((s.mode, s.root_cert.as_deref()), (Mode::VerifyFull, Some("/ca.crt")));
        let s = split("postgres://u@db/orders").unwrap();
        assert_eq!((s.rest.as_str(), s.mode), ("postgres://u@db/orders?sslmode=prefer", Mode::Prefer));
        let s = split("host=db user=u sslmode=verify-ca sslrootcert=/r sslcert=/c sslkey=/k").unwrap();
        assert_eq!(s.rest, "host=db user=u sslmode=require");
        assert_eq!((s.mode, s.cert.as_deref(), s.key.as_deref()), (Mode::VerifyCa, Some("/c"), Some("/k")));
        assert_eq!(split("postgresql://db/x?sslmode=disable").unwrap().rest, "postgresql://db/x?sslmode=disable");
        assert_eq!(split("postgres://db/x?sslmode=allow").unwrap().mode, Mode::Prefer);
        assert!(split("postgres://db/x?sslmode=always").is_err());
        // Spaces around `=` are read as libpq reads them, not as no sslmode
        // (prefer).
        for spaced in ["host=db sslmode =require", "host=db sslmode= require", "host=db sslmode = require"] {
            assert_eq!(
                (split(spaced).unwrap().rest.as_str(), split(spaced).unwrap().mode),
                ("host=db sslmode=require", Mode::Require)
            );
        }
        // Quoted values: a certificate's path with a space, a password with
        // one. Before, a quote anywhere left every TLS setting to
        // tokio-postgres, which refused `sslrootcert`.
        let s = split("host=db password='a b\\'c' sslmode=verify-full sslrootcert='/my certs/ca.pem'").unwrap();
        assert_eq!(s.rest, "host=db password='a b\\'c' sslmode=require");
        assert_eq!((s.mode, s.root_cert.as_deref()), (Mode::VerifyFull, Some("/my certs/ca.pem")));
        assert!(split("host=db sslmode='require").is_err(), "a quote not closed");
        assert!(split("postgres://db/x?sslcert=/c").unwrap().connector().is_err(), "a certificate with no key");
        // verify-ca needs its root file (the system's roots, names unchecked,
        // would pass any public authority's certificate).
        for no_root in ["postgres://db/x?sslmode=verify-ca", "host=db sslmode=verify-ca"] {
            let e = split(no_root).unwrap_err().to_string();
            assert!(e.contains("sslmode=verify-ca needs sslrootcert"), "{no_root}: {e}");
        }
    }

    /// libpq 16's `sslrootcert=system`: the system's roots, and `verify-full`
    /// whether named or not; a weaker mode is refused, not taken.
    #[test]
    fn sslrootcert_system_implies_verify_full_and_refuses_a_weaker_mode() {
        let s = split("postgres://db/x?sslrootcert=system").unwrap();
        assert_eq!((s.rest.as_str(), s.mode), ("postgres://db/x?sslmode=require", Mode::VerifyFull));
        assert_eq!(split("host=db sslrootcert=system sslmode=verify-full").unwrap().mode, Mode::VerifyFull);
        for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
            let e = split(&format!("postgres://db/x?sslmode={weak}&sslrootcert=system")).unwrap_err();
            assert!(e.to_string().contains("use verify-full"), "{weak}: {e}");
        }
        split("postgres://db/x?sslrootcert=system").unwrap().connector().expect("no file named system is read");
    }
}
