//! TLS for real: a test CA and a server certificate for `localhost` (rcgen),
//! a second CA that signed nothing here, TLS listeners of the real services
//! (Redis, Mosquitto, NATS, a RabbitMQ node of its own) started on free
//! ports as child processes, and an HTTPS webhook receiver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{free_port, wait_until};

/// Certificates in PEM files under a temp dir readable by the services
/// (some drop root before reading them).
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA that signed the server certificate.
    pub ca: PathBuf,
    /// A CA that signed nothing the servers use.
    pub other_ca: PathBuf,
    /// The server certificate: `localhost` only (not 127.0.0.1).
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = ca("fnrelay test CA");
        let other = ca("fnrelay unrelated CA");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            set_mode(&path, 0o644);
            path
        };
        let pki = Self {
            ca: write("ca.pem", issuer.pem()),
            other_ca: write("other-ca.pem", other.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            dir,
        };
        set_mode(pki.dir.path(), 0o755);
        pki
    }

    /// The server certificate and key as rustls wants them.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&self.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&self.key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        )
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A service started for one test, stopped (its whole process group) on drop.
pub struct Service {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts `program args` in its own process group and waits for `port`.
async fn start(
    program: &str,
    args: &[String],
    env: &[(&str, String)],
    port: u16,
    dir: tempfile::TempDir,
    within: Duration,
) -> Service {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.path().join("service.log")).unwrap();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (scripts/test.sh installs it): {e}"));
    let service = Service {
        port,
        child,
        _dir: dir,
    };
    let log_path = service._dir.path().join("service.log");
    let what = format!("{program} listening with TLS on :{port}");
    let ready = Arc::new(Mutex::new(false));
    wait_until(&what, within, || {
        let ready = ready.clone();
        let log_path = log_path.clone();
        async move {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            if !up && std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("FATAL")) {
                panic!("{}", std::fs::read_to_string(&log_path).unwrap());
            }
            *ready.lock().unwrap() = up;
            up
        }
    })
    .await;
    service
}

fn service_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o777);
    dir
}

/// Redis with only a TLS port.
pub async fn redis(pki: &Pki) -> Service {
    let port = free_port();
    let p = |p: &PathBuf| p.display().to_string();
    let args: Vec<String> = [
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &p(&pki.cert),
        "--tls-key-file",
        &p(&pki.key),
        "--tls-ca-cert-file",
        &p(&pki.ca),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    start(
        "redis-server",
        &args,
        &[],
        port,
        service_dir(),
        Duration::from_secs(20),
    )
    .await
}

/// Mosquitto with one TLS listener.
pub async fn mosquitto(pki: &Pki) -> Service {
    let port = free_port();
    let dir = service_dir();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca.display(),
            pki.cert.display(),
            pki.key.display()
        ),
    )
    .unwrap();
    set_mode(&conf, 0o644);
    let args = vec!["-c".to_string(), conf.display().to_string()];
    start("mosquitto", &args, &[], port, dir, Duration::from_secs(20)).await
}

/// NATS with JetStream, TLS required.
pub async fn nats(pki: &Pki) -> Service {
    let port = free_port();
    let dir = service_dir();
    let args: Vec<String> = vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "--tls".into(),
        "--tlscert".into(),
        pki.cert.display().to_string(),
        "--tlskey".into(),
        pki.key.display().to_string(),
        "-js".into(),
        "-sd".into(),
        dir.path().join("js").display().to_string(),
    ];
    start(
        "/usr/sbin/nats-server",
        &args,
        &[],
        port,
        dir,
        Duration::from_secs(20),
    )
    .await
}

/// A RabbitMQ node of its own with only a TLS listener (the shared broker
/// keeps its plain port).
pub async fn rabbitmq(pki: &Pki) -> Service {
    let port = free_port();
    let dir = service_dir();
    let base = dir.path();
    std::fs::write(
        base.join("rabbitmq.conf"),
        format!(
            "listeners.tcp = none\nlisteners.ssl.default = {port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
            pki.ca.display(),
            pki.cert.display(),
            pki.key.display()
        ),
    )
    .unwrap();
    std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
    let node = format!("fnrelay-tls-{port}@localhost");
    let env = [
        ("RABBITMQ_NODENAME", node),
        (
            "RABBITMQ_CONFIG_FILE",
            base.join("rabbitmq").display().to_string(),
        ),
        (
            "RABBITMQ_MNESIA_BASE",
            base.join("mnesia").display().to_string(),
        ),
        ("RABBITMQ_LOG_BASE", base.join("log").display().to_string()),
        ("RABBITMQ_DIST_PORT", free_port().to_string()),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            base.join("enabled_plugins").display().to_string(),
        ),
        ("RABBITMQ_PID_FILE", base.join("pid").display().to_string()),
    ];
    start(
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
        &[],
        &env,
        port,
        dir,
        Duration::from_secs(90),
    )
    .await
}

/// An HTTPS webhook receiver that answers 200 and keeps the bodies.
pub struct HttpsReceiver {
    pub port: u16,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsReceiver {
    pub async fn start(pki: &Pki) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let seen = bodies.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                if let Ok(v) = serde_json::from_slice(&body) {
                    seen.lock().unwrap().push(v);
                }
                "ok"
            }
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { port, bodies, task }
    }
}
