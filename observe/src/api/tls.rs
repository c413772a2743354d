//! The flow API's TLS, read again while the agent runs: certificates are
//! renewed before they expire (a Secret the kubelet rewrites in place), and
//! new connections get the new ones without a restart. The server does the
//! handshakes itself (tonic's own TLS takes its certificates once, when the
//! server is built), with the newest certificates that parse; a renewal that
//! does not parse is logged and the certificates in use stay.

use std::{fmt, io, sync::Arc, time::Duration};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const HANDSHAKES: usize = 256;

/// The flow API's TLS: its certificate and key (PEM), and when set, the CA
/// client certificates must chain to (mutual TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// What is wrong with the flow API's certificate, key or client CA.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate: {0}")]
    Certificate(rustls::pki_types::pem::Error),
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("the key: {0}")]
    Key(rustls::pki_types::pem::Error),
    #[error("the TLS versions: {0}")]
    Versions(rustls::Error),
    #[error("the client CA: {0}")]
    ClientCaPem(rustls::pki_types::pem::Error),
    #[error("the client CA: {0}")]
    ClientCa(rustls::Error),
    #[error("the client CA: {0}")]
    ClientVerifier(rustls::server::VerifierBuilderError),
    #[error("the certificate and key: {0}")]
    CertificateAndKey(rustls::Error),
}

impl Tls {
    /// Parses the certificate, key and CA as the server will; the error says
    /// what is wrong with them.
    pub fn check(&self) -> Result<(), TlsError> {
        self.server_config().map(|_| ())
    }

    fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Certificate)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(TlsError::Key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    roots.add(c.map_err(TlsError::ClientCaPem)?).map_err(TlsError::ClientCa)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(TlsError::ClientVerifier)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(certs, key).map_err(TlsError::CertificateAndKey)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Why new certificates could not be read (the source's own error).
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// Where the TLS comes from, and how often to read it again.
#[derive(Clone)]
pub struct TlsSource {
    pub load: Arc<dyn Fn() -> Result<Tls, LoadError> + Send + Sync>,
    pub every: Duration,
}

impl fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSource").field("every", &self.every).finish_non_exhaustive()
    }
}

impl TlsSource {
    /// Certificates that never change.
    pub fn fixed(tls: Tls) -> Self {
        TlsSource { load: Arc::new(move || Ok(tls.clone())), every: Duration::from_secs(3600) }
    }
}

/// The TLS connections made on `listener`, each with the newest
/// certificates of `source`, for the gRPC server to serve.
pub(crate) fn incoming(
    listener: TcpListener,
    source: TlsSource,
) -> anyhow::Result<ReceiverStream<io::Result<TlsStream<TcpStream>>>> {
    // No certificates yet (not issued, or not written to the node yet):
    // TLS connections are closed until they can be read.
    let mut current: Option<(Tls, Arc<ServerConfig>)> = match (source.load)() {
        Ok(tls) => {
            let config = tls.server_config()?;
            Some((tls, config))
        }
        Err(e) => {
            tracing::warn!("flow API: no TLS certificates yet ({e}); TLS connections wait for them");
            None
        }
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
        let mut reload = tokio::time::interval(source.every);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = reload.tick() => match (source.load)() {
                    Ok(new) if current.as_ref().is_none_or(|(tls, _)| *tls != new) => match new.server_config() {
                        Ok(c) => {
                            current = Some((new, c));
                            tracing::info!("flow API: serving new TLS certificates");
                        }
                        Err(e) => tracing::warn!("flow API: keeping the TLS certificates in use, the new ones: {e}"),
                    },
                    Ok(_) => {}
                    Err(e) if current.is_none() => tracing::debug!("flow API: still no TLS certificates: {e}"),
                    Err(e) => tracing::warn!("flow API: keeping the TLS certificates in use, reading new ones: {e}"),
                },
                accepted = listener.accept() => {
                    let tcp = match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(e) => {
                            // Out of file descriptors, say: wait, do not stop serving.
                            tracing::warn!("flow API: accepting a connection: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Some((_, config)) = &current else { continue };
                    let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                    let (acceptor, tx) = (TlsAcceptor::from(config.clone()), tx.clone());
                    tokio::spawn(async move {
                        if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        drop(permit);
                    });
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
