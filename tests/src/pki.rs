//! Test certificates made with the openssl command: CAs, and server or
//! client certificates signed by them, in a folder removed on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A folder of certificates.
pub struct Pki {
    pub dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

impl Pki {
    /// A fresh folder under the temp dir; None when openssl is missing.
    pub fn new(name: &str) -> Option<Pki> {
        Command::new("openssl").arg("version").output().ok()?;
        let dir = std::env::temp_dir().join(format!("weft-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        Some(Pki { dir })
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(&self.dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A CA: `NAME-ca.pem` and `NAME-ca.key`.
    pub fn ca(&self, name: &str) -> &Self {
        let (key, pem, subject) =
            (format!("{name}-ca.key"), format!("{name}-ca.pem"), format!("/CN=weft test {name} CA"));
        self.openssl(
            &[&["req", "-x509"][..], &EC, &["-days", "1", "-subj", &subject, "-keyout", &key, "-out", &pem]].concat(),
        );
        self
    }

    /// `NAME.pem` and `NAME.key` signed by CA `ca`: a server certificate for
    /// localhost and 127.0.0.1, or a client certificate.
    pub fn leaf(&self, ca: &str, name: &str, server: bool) -> &Self {
        let usage = if server {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        // Extensions make the certificate X.509 v3, which rustls requires.
        std::fs::write(self.dir.join(format!("{name}.cnf")), format!("basicConstraints=CA:FALSE\n{usage}")).unwrap();
        let (key, csr, pem, cn) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
        self.openssl(&[&["req"][..], &EC, &["-subj", &cn, "-keyout", &key, "-out", &csr]].concat());
        let (ca_pem, ca_key, ext) = (format!("{ca}-ca.pem"), format!("{ca}-ca.key"), format!("{name}.cnf"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
        self
    }

    /// A file of the folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

/// `otelcol` (the OpenTelemetry Collector) on PATH: tests/env.sh puts
/// ../shared/bin's there.
pub fn otelcol() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("otelcol")).find(|p| p.is_file())
}

/// The Collector's mutual-TLS config beside the repository (../shared/otel).
pub fn collector_tls_config() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [root.join("../shared/otel/collector-tls.yaml"), PathBuf::from("/work/shared/otel/collector-tls.yaml")]
        .into_iter()
        .find(|p| p.is_file())
}

/// The line a test prints when the Collector is not there.
pub const NO_COLLECTOR: &str =
    "SKIPPED: needs otelcol on PATH (tests/env.sh unpacks ../shared/bin) and ../shared/otel/collector-tls.yaml";

/// The Collector's command with the mutual-TLS config: server certificate
/// `server` and client CA `client_ca` of `pki`, records to `out_dir/out.json`.
pub fn collector_command(pki: &Pki, client_ca: &str, out_dir: &Path, grpc: u16, http: u16) -> Option<Command> {
    let (bin, config) = (otelcol()?, collector_tls_config()?);
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .env("OTEL_OUT", out_dir)
        .env("OTEL_TLS_CERT", pki.path("server.pem"))
        .env("OTEL_TLS_KEY", pki.path("server.key"))
        .env("OTEL_TLS_CLIENT_CA", pki.path(&format!("{client_ca}-ca.pem")))
        .env("OTEL_GRPC_ENDPOINT", format!("127.0.0.1:{grpc}"))
        .env("OTEL_HTTP_ENDPOINT", format!("127.0.0.1:{http}"));
    Some(cmd)
}
