//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager on 127.0.0.1, with TLS, RBAC, Node authorization,
//! ServiceAccount tokens and an audit log, started once per test binary and
//! shared by its tests ([`ControlPlane::shared`]).
//!
//! The binaries come from `$KUBEBUILDER_ASSETS` (envtest's convention: a
//! folder with `etcd`, `kube-apiserver`, `kubectl` and optionally
//! `kube-controller-manager`), else from `../shared/k8s/bin` beside the
//! repository (unpacked once by `../shared/tools/unpack.sh`). Without either,
//! each test that needs them prints one line saying how to get them and
//! passes ([`require_control_plane!`](crate::require_control_plane)).
//!
//! Each run has its own folder (certificates, etcd's data, logs, kubeconfigs)
//! and its own free ports. Everything it started stops, and its folder goes,
//! when the test binary exits (an `atexit` hook: tests that panic are caught
//! by the test harness, which then exits normally), when the value drops,
//! and when the test process is killed: the components are started from one
//! long-lived thread with `PR_SET_PDEATHSIG`, so the kernel kills them with
//! the process, and the next run removes folders whose process is gone.
//!
//! What differs from a cluster, and why:
//! - No kubelet: tests write Node and Pod objects, and Pod status, as a
//!   kubelet would ([`super::objects`]), with the node's own credentials.
//! - The node lifecycle controller is off: with no kubelet renewing node
//!   Leases it would mark every node unreachable after 50 s and every pod on
//!   them not ready.
//! - The API server advertises 127.0.0.1, so its endpoint reconciler is off.
//! - NetworkPolicies have no watch cache (`--watch-cache-sizes`): their
//!   watches are served by etcd itself, so compacting etcd makes a stale
//!   resourceVersion a real 410 on demand ([`ControlPlane::compact_etcd`]);
//!   every other kind is served from the cache, as on any cluster.
//! - The audit log records the requests of everyone but the control plane's
//!   own components, so tests can see whether a client resumed or relisted
//!   ([`ControlPlane::audit`]).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::Value;

/// The Service range the API server allocates ClusterIPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Printed (once per test) when no binaries are found.
pub const SKIP_LINE: &str = "SKIPPED: needs a Kubernetes control plane (etcd, kube-apiserver, kubectl, kube-controller-manager): set KUBEBUILDER_ASSETS to a folder holding them (`setup-envtest use -p path`, or your distribution's Kubernetes packages)";

/// How long a component may take to become ready on a busy 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A process of the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Etcd,
    ApiServer,
    ControllerManager,
}

impl Component {
    fn binary(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
        }
    }
}

/// The control plane. See the module doc.
pub struct ControlPlane {
    /// The run's folder.
    pub dir: PathBuf,
    assets: PathBuf,
    /// The API server's port on 127.0.0.1.
    pub api_port: u16,
    etcd_port: u16,
    etcd_peer_port: u16,
    controller_manager: bool,
    procs: Mutex<BTreeMap<Component, Child>>,
    /// Serializes openssl runs and kubeconfig writes.
    files: Mutex<()>,
}

/// The folder holding the control plane's binaries: `$KUBEBUILDER_ASSETS`,
/// else ../shared/k8s/bin unpacked; None when there is neither.
pub fn find_assets() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    // `shared` beside the repository (or the main checkout's, from a worktree).
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = [repo.join("../shared"), PathBuf::from("/work/shared")]
        .into_iter()
        .find(|s| s.join("k8s/bin").is_dir() && s.join("tools/unpack.sh").exists())?;
    let (packed, unpack) = (shared.join("k8s/bin"), shared.join("tools/unpack.sh"));
    let out = Command::new(&unpack).arg(&packed).stderr(Stdio::inherit()).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The one shared control plane of this test binary, and the lock tests
/// take to use it (shared) or to disrupt it (exclusive).
static SHARED: OnceLock<Result<&'static ControlPlane, String>> = OnceLock::new();
static USE: RwLock<()> = RwLock::new(());

/// The shared control plane, held for as long as a test uses it; tests that
/// restart components or compact etcd hold [`Exclusive`] instead.
pub struct Shared {
    cp: &'static ControlPlane,
    _use: RwLockReadGuard<'static, ()>,
}

impl std::ops::Deref for Shared {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        self.cp
    }
}

/// The shared control plane, with no other test using it.
pub struct Exclusive {
    cp: &'static ControlPlane,
    _use: RwLockWriteGuard<'static, ()>,
}

impl std::ops::Deref for Exclusive {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        self.cp
    }
}

/// Returns the shared control plane from a test, or prints [`SKIP_LINE`] and
/// returns from the test when there are no binaries.
#[macro_export]
macro_rules! require_control_plane {
    () => {
        match $crate::k8s::ControlPlane::shared() {
            Some(cp) => cp,
            None => {
                eprintln!("{}", $crate::k8s::control_plane::SKIP_LINE);
                return;
            }
        }
    };
    (exclusive) => {
        match $crate::k8s::ControlPlane::exclusive() {
            Some(cp) => cp,
            None => {
                eprintln!("{}", $crate::k8s::control_plane::SKIP_LINE);
                return;
            }
        }
    };
}

extern "C" fn stop_at_exit() {
    if let Some(Ok(cp)) = SHARED.get() {
        cp.stop_all();
    }
}

impl ControlPlane {
    fn get() -> Option<&'static ControlPlane> {
        let r = SHARED.get_or_init(|| {
            let assets = find_assets().ok_or_else(String::new)?;
            let cp = ControlPlane::start(&assets).map_err(|e| format!("{e:#}"))?;
            let cp: &'static ControlPlane = Box::leak(Box::new(cp));
            // SAFETY: registers a plain function, called once at exit.
            unsafe { libc::atexit(stop_at_exit) };
            Ok(cp)
        });
        match r {
            Ok(cp) => Some(cp),
            Err(e) if e.is_empty() => None,
            Err(e) => panic!("the Kubernetes control plane did not start: {e}"),
        }
    }

    /// The control plane of this test binary (started by the first caller),
    /// or None when no binaries are found. Panics if they are found but do
    /// not start.
    pub fn shared() -> Option<Shared> {
        let cp = Self::get()?;
        Some(Shared { cp, _use: USE.read().unwrap_or_else(|e| e.into_inner()) })
    }

    /// Like [`ControlPlane::shared`], once no other test holds it: for tests
    /// that stop or restart components or compact etcd. A test holding
    /// [`Shared`] must not ask for this (it would wait for itself).
    pub fn exclusive() -> Option<Exclusive> {
        let cp = Self::get()?;
        Some(Exclusive { cp, _use: USE.write().unwrap_or_else(|e| e.into_inner()) })
    }

    /// Starts a control plane of its own from the binaries in `assets`
    /// (most tests want [`ControlPlane::shared`]). Stops when dropped.
    pub fn start(assets: &Path) -> anyhow::Result<Self> {
        for bin in ["etcd", "kube-apiserver", "kubectl"] {
            anyhow::ensure!(
                assets.join(bin).exists(),
                "{} has no {bin}: KUBEBUILDER_ASSETS must hold etcd, kube-apiserver and kubectl",
                assets.display()
            );
        }
        reap_stale_runs();
        let dir = new_run_dir()?;
        let [api_port, etcd_port, etcd_peer_port] = free_ports()?;
        let cp = ControlPlane {
            controller_manager: assets.join("kube-controller-manager").exists(),
            dir,
            assets: assets.to_owned(),
            api_port,
            etcd_port,
            etcd_peer_port,
            procs: Mutex::new(BTreeMap::new()),
            files: Mutex::new(()),
        };
        let started = Instant::now();
        cp.write_pki().context("making certificates with openssl")?;
        cp.write_files()?;
        cp.start_component(Component::Etcd)?;
        cp.start_component(Component::ApiServer)?;
        if cp.controller_manager {
            cp.start_component(Component::ControllerManager)?;
        }
        eprintln!(
            "[k8s] control plane ready in {:.1?}: https://127.0.0.1:{api_port}, KUBECONFIG={}",
            started.elapsed(),
            cp.admin_kubeconfig().display()
        );
        Ok(cp)
    }

    /// Whether kube-controller-manager runs (EndpointSlices, garbage
    /// collection, namespace deletion, default ServiceAccounts).
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The API server's address (on this machine's loopback).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    /// The folder holding kube-apiserver, kubectl, ...
    pub fn assets(&self) -> &Path {
        &self.assets
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// The cluster CA's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.pki().join("ca.crt")
    }

    /// A kubeconfig for a cluster admin (group system:masters, bearer token).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn admin_token(&self) -> String {
        fs::read_to_string(self.pki().join("admin.token")).unwrap_or_default()
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("openssl").args(args).current_dir(self.pki()).output().context("running openssl")?;
        anyhow::ensure!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Issues `name.crt`/`name.key` signed by the cluster CA.
    fn leaf(&self, name: &str, subject: &str, usage: &str, san: Option<&str>) -> anyhow::Result<()> {
        let mut ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        );
        if let Some(san) = san {
            let _ = writeln!(ext, "subjectAltName={san}");
        }
        fs::write(self.pki().join(format!("{name}.ext")), ext)?;
        let (key, csr, crt, extf) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "3650",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &extf,
            "-out",
            &crt,
        ])?;
        let _ = fs::remove_file(self.pki().join(csr));
        Ok(())
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        fs::create_dir_all(self.pki())?;
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=weft-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])?;
        self.leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "serverAuth",
            Some("IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"),
        )?;
        self.leaf("controller-manager", "/CN=system:kube-controller-manager", "clientAuth", None)?;
        // The ServiceAccount token signing key.
        self.openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"])?;
        self.openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let token = random_hex(24)?;
        write_private(&self.pki().join("admin.token"), &token)?;
        write_private(&self.pki().join("tokens.csv"), &format!("{token},weft-admin,weft-admin,\"system:masters\"\n"))?;
        Ok(())
    }

    fn write_files(&self) -> anyhow::Result<()> {
        // Everything but the control plane's own components.
        fs::write(
            self.dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: None\n  users: [system:kube-controller-manager, system:apiserver, system:kube-scheduler]\n\
             - level: None\n  userGroups: [system:serviceaccounts:kube-system]\n\
             - level: None\n  nonResourceURLs: [/readyz*, /healthz*, /livez*, /version, /openapi*, /api, /apis, /apis/*]\n\
             - level: Metadata\n",
        )?;
        self.write_kubeconfig(&self.admin_kubeconfig(), "weft-admin", &format!("token: {}", self.admin_token()))?;
        let pki = self.pki();
        self.write_kubeconfig(
            &self.dir.join("controller-manager.kubeconfig"),
            "system:kube-controller-manager",
            &format!(
                "client-certificate: {}\n    client-key: {}",
                pki.join("controller-manager.crt").display(),
                pki.join("controller-manager.key").display()
            ),
        )?;
        Ok(())
    }

    /// Writes a kubeconfig for this cluster; `user` holds the user's lines
    /// (`token: ...`, or `client-certificate: ...` and `client-key: ...`).
    pub fn write_kubeconfig(&self, path: &Path, name: &str, user: &str) -> io::Result<()> {
        self.write_kubeconfig_for(path, &self.server_url(), name, user)
    }

    /// Like [`ControlPlane::write_kubeconfig`], for a client that reaches the
    /// API server at `server` (through an [`super::ApiRelay`], say).
    pub fn write_kubeconfig_for(&self, path: &Path, server: &str, name: &str, user: &str) -> io::Result<()> {
        let _g = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n- name: \"{name}\"\n  user:\n    {user}\ncontexts:\n- name: test\n  context: {{cluster: weft-test, user: \"{name}\", namespace: default}}\n\
             current-context: test\n",
            ca = self.ca_file().display(),
        );
        write_private(path, &text)
    }

    fn args(&self, c: Component) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let pki = |p: &str| self.pki().join(p).display().to_string();
        let v: Vec<String> = match c {
            Component::Etcd => vec![
                "--name=weft-test".into(),
                format!("--data-dir={}", d("etcd-data")),
                format!("--listen-client-urls=http://127.0.0.1:{}", self.etcd_port),
                format!("--listen-peer-urls=http://127.0.0.1:{}", self.etcd_peer_port),
                "--unsafe-no-fsync".into(),
            ],
            Component::ApiServer => vec![
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={}", self.api_port),
                format!("--cert-dir={}", d("apiserver-certs")),
                format!("--tls-cert-file={}", pki("apiserver.crt")),
                format!("--tls-private-key-file={}", pki("apiserver.key")),
                format!("--client-ca-file={}", pki("ca.crt")),
                format!("--token-auth-file={}", pki("tokens.csv")),
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", pki("sa.pub")),
                format!("--service-account-signing-key-file={}", pki("sa.key")),
                "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--enable-priority-and-fairness=false".into(),
                "--endpoint-reconciler-type=none".into(),
                "--watch-cache-sizes=networkpolicies.networking.k8s.io#0".into(),
                format!("--audit-policy-file={}", d("audit-policy.yaml")),
                format!("--audit-log-path={}", d("audit.log")),
                "--audit-log-format=json".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
            Component::ControllerManager => vec![
                format!("--kubeconfig={}", d("controller-manager.kubeconfig")),
                format!("--authentication-kubeconfig={}", d("controller-manager.kubeconfig")),
                format!("--authorization-kubeconfig={}", d("controller-manager.kubeconfig")),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!("--root-ca-file={}", pki("ca.crt")),
                format!("--cluster-signing-cert-file={}", pki("ca.crt")),
                format!("--cluster-signing-key-file={}", pki("ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                // No kubelet renews node Leases here (see the module doc).
                "--controllers=*,-nodelifecycle".into(),
                "--v=1".into(),
            ],
        };
        v
    }

    /// Starts a component (stopped, or not yet started) and waits until it serves.
    pub fn start_component(&self, c: Component) -> anyhow::Result<()> {
        let log =
            fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{}.log", c.binary())))?;
        let mut cmd = Command::new(self.assets.join(c.binary()));
        cmd.args(self.args(c)).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = keeper::spawn(cmd).with_context(|| format!("starting {}", c.binary()))?;
        let pid = child.id();
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).insert(c, child);
        self.record_pids()?;
        let started = Instant::now();
        loop {
            if self.ready(c) {
                return Ok(());
            }
            let exited = {
                let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
                procs.get_mut(&c).is_none_or(|ch| !matches!(ch.try_wait(), Ok(None)))
            };
            if exited || started.elapsed() > READY_TIMEOUT {
                let why = if exited { "exited" } else { "is not ready" };
                anyhow::bail!(
                    "{} (pid {pid}) {why} after {:.0?}; the end of its log ({}):\n{}",
                    c.binary(),
                    started.elapsed(),
                    self.log_path(c).display(),
                    self.log_tail(c, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn ready(&self, c: Component) -> bool {
        match c {
            Component::Etcd => self.etcd_post("/v3/maintenance/status", "{}").is_ok(),
            Component::ApiServer => self.api_get("/readyz").is_ok_and(|b| b.trim() == "ok"),
            // Its ServiceAccount controller has made the default namespace's
            // "default" ServiceAccount (Pods need it).
            Component::ControllerManager => {
                self.kubectl(&["get", "serviceaccount", "default", "-n", "default"]).status.success()
            }
        }
    }

    /// A component's log file.
    pub fn log_path(&self, c: Component) -> PathBuf {
        self.dir.join(format!("{}.log", c.binary()))
    }

    /// The last `n` lines of a component's log.
    pub fn log_tail(&self, c: Component, n: usize) -> String {
        let text = fs::read_to_string(self.log_path(c)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops a component (SIGTERM, then SIGKILL after 20 s) and waits for it.
    pub fn stop_component(&self, c: Component) {
        let child = self.procs.lock().unwrap_or_else(|e| e.into_inner()).remove(&c);
        if let Some(mut child) = child {
            stop_child(&mut child);
        }
        let _ = self.record_pids();
    }

    /// Stops and starts a component again with the same data and ports.
    pub fn restart_component(&self, c: Component) -> anyhow::Result<()> {
        self.stop_component(c);
        self.start_component(c)
    }

    fn stop_all(&self) {
        for c in [Component::ControllerManager, Component::ApiServer, Component::Etcd] {
            self.stop_component(c);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Records the running components' pids, for the next run to reap if
    /// this process dies without cleaning up.
    fn record_pids(&self) -> io::Result<()> {
        let procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = format!("{}\n", std::process::id());
        for (c, child) in procs.iter() {
            let _ = writeln!(text, "{} {}", child.id(), self.assets.join(c.binary()).display());
        }
        fs::write(self.dir.join("pids"), text)
    }

    /// A GET on the API server as admin (non-resource paths like /readyz).
    pub fn api_get(&self, path: &str) -> anyhow::Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(self.ca_file())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.admin_token()))
            .arg(format!("{}{path}", self.server_url()))
            .output()
            .context("running curl")?;
        anyhow::ensure!(out.status.success(), "GET {path}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A POST to etcd's JSON gateway (`/v3/...`); the response body.
    fn etcd_post(&self, path: &str, body: &str) -> anyhow::Result<Value> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "-X", "POST", "-d", body])
            .arg(format!("http://127.0.0.1:{}{path}", self.etcd_port))
            .output()
            .context("running curl")?;
        anyhow::ensure!(out.status.success(), "etcd {path}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// etcd's current revision (every resourceVersion is one of its revisions).
    pub fn etcd_revision(&self) -> anyhow::Result<u64> {
        let status = self.etcd_post("/v3/maintenance/status", "{}")?;
        status["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("no revision in etcd's status: {status}"))
    }

    /// Compacts etcd's history up to its current revision (what the API
    /// server does every five minutes): a watch or list resuming from an
    /// older resourceVersion that etcd serves gets 410 Gone. Returns the
    /// revision.
    pub fn compact_etcd(&self) -> anyhow::Result<u64> {
        let rev = self.etcd_revision()?;
        self.etcd_post("/v3/kv/compaction", &format!("{{\"revision\": \"{rev}\", \"physical\": true}}"))?;
        Ok(rev)
    }

    /// Runs kubectl as admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.admin_kubeconfig(), args, None)
    }

    /// Runs kubectl with a kubeconfig and, optionally, text on its stdin.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(self.assets.join("kubectl"));
        cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let text = text.to_owned();
            std::thread::spawn(move || pipe.write_all(text.as_bytes()));
        }
        child.wait_with_output().expect("kubectl runs")
    }

    /// Runs kubectl as admin; its stdout, or a panic with what it said.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        ok_or_panic(args, self.kubectl(args))
    }

    /// `kubectl apply -f -` of `yaml` as admin (server-side, so what is
    /// refused says why); what kubectl printed (stdout and stderr: warnings
    /// are on stderr), or a panic with it.
    pub fn apply(&self, yaml: &str) -> String {
        let args = ["apply", "--server-side", "--force-conflicts", "-f", "-"];
        let out = self.kubectl_as(&self.admin_kubeconfig(), &args, Some(yaml));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        format!("{}{stderr}", ok_or_panic(&args, out))
    }

    /// A kube client (admin) on the current tokio runtime.
    pub async fn client(&self) -> kube::Client {
        self.client_for(&self.admin_kubeconfig()).await
    }

    /// A kube client from one of this cluster's kubeconfigs, on the current tokio runtime.
    pub async fn client_for(&self, kubeconfig: &Path) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig reads");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("kubeconfig is valid");
        kube::Client::try_from(config).expect("client")
    }

    /// A kubeconfig for node `name`: a client certificate for
    /// `system:node:<name>` (group system:nodes), so the Node authorizer and
    /// NodeRestriction treat it as that node's kubelet.
    pub fn node_kubeconfig(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("node-{name}.kubeconfig"));
        if path.exists() {
            return Ok(path);
        }
        let file = format!("node-{name}");
        self.leaf(&file, &format!("/O=system:nodes/CN=system:node:{name}"), "clientAuth", None)?;
        let pki = self.pki();
        self.write_kubeconfig(
            &path,
            &format!("system:node:{name}"),
            &format!(
                "client-certificate: {}\n    client-key: {}",
                pki.join(format!("{file}.crt")).display(),
                pki.join(format!("{file}.key")).display()
            ),
        )?;
        Ok(path)
    }

    /// A token of ServiceAccount `namespace/name` from the TokenRequest API,
    /// bound to a Pod (name) when given, as a kubelet gets one for the Pod's
    /// projected token: the token then names the Pod's node, and dies with the Pod.
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        bound_pod: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut args = vec!["create", "token", name, "-n", namespace, "--duration", "2h"];
        let uid;
        if let Some(pod) = bound_pod {
            uid = self.kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"]);
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod, "--bound-object-uid", &uid]);
        }
        let out = self.kubectl(&args);
        anyhow::ensure!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// A kubeconfig holding [`ControlPlane::service_account_token`]'s token.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        bound_pod: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let token = self.service_account_token(namespace, name, bound_pod)?;
        let path = self.dir.join(format!("sa-{namespace}-{name}-{}.kubeconfig", bound_pod.unwrap_or("unbound")));
        self.write_kubeconfig(&path, &format!("system:serviceaccount:{namespace}:{name}"), &format!("token: {token}"))?;
        Ok(path)
    }

    /// A namespace of its own for a test, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> TestNamespace<'_> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::SeqCst));
        self.kubectl_ok(&["create", "namespace", &name]);
        TestNamespace { cp: self, name }
    }

    /// The audit log so far: one entry per request that completed (or, for
    /// watches, started), by everyone but the control plane's components.
    pub fn audit(&self) -> Vec<AuditEvent> {
        fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| AuditEvent {
                verb: v["verb"].as_str().unwrap_or_default().to_owned(),
                uri: v["requestURI"].as_str().unwrap_or_default().to_owned(),
                user: v["user"]["username"].as_str().unwrap_or_default().to_owned(),
                stage: v["stage"].as_str().unwrap_or_default().to_owned(),
                code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            })
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn ok_or_panic(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One request in the API server's audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// get, list, watch, create, update, patch, delete, ...
    pub verb: String,
    /// Path and query as the client sent them.
    pub uri: String,
    /// Who (`system:serviceaccount:weft-system:weft-agent`, `weft-admin`, ...).
    pub user: String,
    /// ResponseComplete, or ResponseStarted for a watch that began.
    pub stage: String,
    pub code: u16,
}

impl AuditEvent {
    /// A query parameter of the request.
    pub fn param(&self, key: &str) -> Option<&str> {
        let (_, q) = self.uri.split_once('?')?;
        q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

/// A namespace made for one test; deleted (with everything in it, by the
/// namespace controller) when dropped.
pub struct TestNamespace<'a> {
    cp: &'a ControlPlane,
    pub name: String,
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        let _ = self.cp.kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Three ports free on 127.0.0.1 now (bound, then released).
fn free_ports() -> io::Result<[u16; 3]> {
    let ls = [
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([ls[0].local_addr()?.port(), ls[1].local_addr()?.port(), ls[2].local_addr()?.port()])
}

fn runs_root() -> PathBuf {
    std::env::temp_dir().join("weft-k8s")
}

fn new_run_dir() -> io::Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = runs_root().join(format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
    fs::create_dir_all(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    fs::write(dir.join("pids"), format!("{}\n", std::process::id()))?;
    Ok(dir)
}

/// Removes the folders of runs whose test process is gone, stopping any
/// component of theirs still running (its pid still running its binary).
fn reap_stale_runs() {
    let Ok(entries) = fs::read_dir(runs_root()) else { return };
    for e in entries.flatten() {
        let Ok(text) = fs::read_to_string(e.path().join("pids")) else { continue };
        let mut lines = text.lines();
        let owner = lines.next().unwrap_or_default().trim();
        if owner.is_empty() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        for l in lines {
            let Some((pid, bin)) = l.split_once(' ') else { continue };
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
            if let (Some(exe), Ok(pid)) = (exe, pid.parse::<i32>())
                && exe == Path::new(bin)
            {
                // SAFETY: signals a process verified to run the recorded binary.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

fn stop_child(child: &mut Child) {
    // SAFETY: signals our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts processes from one thread that lives as long as the test
/// process, with PR_SET_PDEATHSIG: the kernel kills them when that thread
/// (so, the process) ends, however it ends. (The signal follows the thread
/// that forked, so short-lived test threads cannot be the parent.)
mod keeper {
    use super::*;

    type Request = (Command, mpsc::Sender<io::Result<Child>>);

    fn sender() -> &'static Mutex<mpsc::Sender<Request>> {
        static TX: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
        TX.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Request>();
            std::thread::Builder::new()
                .name("k8s-keeper".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        // SAFETY: only async-signal-safe calls between fork and exec.
                        unsafe {
                            cmd.pre_exec(|| {
                                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                    return Err(io::Error::last_os_error());
                                }
                                Ok(())
                            });
                        }
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .expect("keeper thread starts");
            Mutex::new(tx)
        })
    }

    /// Spawns `cmd` from the keeper thread.
    pub fn spawn(cmd: Command) -> io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        sender().lock().unwrap_or_else(|e| e.into_inner()).send((cmd, tx)).map_err(io::Error::other)?;
        rx.recv().map_err(io::Error::other)?
    }
}
