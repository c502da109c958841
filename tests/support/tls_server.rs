//! A private PostgreSQL that takes TLS connections only, with a test
//! authority's certificate for `localhost` (and another authority's, for
//! refusals). Shared by the API tests and the system-roots test.

use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};
use ordercast::db::embedded::EmbeddedPostgres;

fn key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

/// A certificate for `cn`, signed by `issuer` (self-signed without one);
/// `ca` makes it an authority, else it names `localhost`.
fn certificate(cn: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>, ca: bool) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&openssl::bn::BigNum::from_u32(rand_serial()).unwrap().to_asn1_integer().unwrap()).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&name, |(c, _)| c.subject_name())).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    } else {
        let san =
            SubjectAlternativeName::new().dns("localhost").build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None));
        b.append_extension(san.unwrap()).unwrap();
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256()).unwrap();
    b.build()
}

fn rand_serial() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32 >> 1
}

/// Writes `data` to `path`, readable by the server (the postgres user when
/// the tests run as root), and by it alone for a key.
fn write(path: &Path, data: &[u8], private: bool) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(if private { 0o600 } else { 0o644 })).unwrap();
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        nix::unistd::chown(path, Some(pg.uid), Some(pg.gid)).unwrap();
    }
}

pub struct TlsServer {
    pg: Option<EmbeddedPostgres>,
    dir: PathBuf,
    /// The authority's certificate, and another authority's.
    pub ca: PathBuf,
    pub other_ca: PathBuf,
}

impl TlsServer {
    pub async fn start() -> TlsServer {
        let dir = std::env::temp_dir().join(format!("ordercast-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_key, other_key, server_key) = (key(), key(), key());
        let ca = certificate("ordercast test authority", &ca_key, None, true);
        let other = certificate("another authority", &other_key, None, true);
        let server = certificate("localhost", &server_key, Some((&ca, &ca_key)), false);
        let path = |name: &str| dir.join(name);
        write(&path("ca.crt"), &ca.to_pem().unwrap(), false);
        write(&path("other.crt"), &other.to_pem().unwrap(), false);
        write(&path("server.crt"), &server.to_pem().unwrap(), false);
        write(&path("server.key"), &server_key.private_key_to_pem_pkcs8().unwrap(), true);
        // TLS only: a connection without it is refused.
        write(&path("hba.conf"), b"hostnossl all all 0.0.0.0/0 reject\nhostssl all all 127.0.0.1/32 trust\n", false);
        let options = format!(
            "-c fsync=off -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c hba_file={}",
            path("server.crt").display(),
            path("server.key").display(),
            path("hba.conf").display()
        );
        let pg_dir = path("data");
        let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&pg_dir, &options))
            .await
            .unwrap()
            .expect("a PostgreSQL that takes TLS only");
        TlsServer { pg: Some(pg), ca: path("ca.crt"), other_ca: path("other.crt"), dir }
    }

    pub fn url(&self, host: &str, params: &str) -> String {
        let port = self.pg.as_ref().unwrap().port();
        format!("postgres://postgres@{host}:{port}/postgres?connect_timeout=10&{params}")
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        drop(self.pg.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects and says whether the session is encrypted.
pub async fn encrypted(url: &str) -> anyhow::Result<bool> {
    let db = ordercast::db::connect(url).await?;
    Ok(db.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?.get(0))
}
