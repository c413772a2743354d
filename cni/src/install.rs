//! `weft-cni install` and `weft-cni uninstall`: what the DaemonSet's init
//! container does on each node. weft chains onto the node's primary CNI
//! rather than replacing it, so it does not write a network of its own: it
//! copies the plugin into the runtime's binary folder and appends itself to
//! the plugin list of the configuration the runtime uses, the first file of
//! the configuration folder by name (as libcni orders them). A single-plugin
//! `.conf` becomes a `.conflist` of the same name. Both steps replace files
//! by rename, so a runtime never reads half of one, and both are idempotent:
//! a restarted init container changes nothing more.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

/// The plugin's `type`, and its file name in the binary folder.
pub const PLUGIN: &str = "weft-cni";
/// Extensions of the files libcni reads as network configurations.
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];
/// The largest configuration file read.
const MAX_CONF_BYTES: u64 = 1 << 20;

/// What went wrong, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a CNI network configuration: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {problem}")]
    Conf { path: PathBuf, problem: ConfProblem },
    #[error(
        "no CNI configuration (*.conf, *.conflist, *.json) in {dir} after {waited:?}: weft chains onto a primary CNI, install that first"
    )]
    NoPrimary { dir: PathBuf, waited: Duration },
}

/// Why a primary CNI configuration cannot have weft-cni chained onto it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfProblem {
    #[error("not a JSON object")]
    NotAnObject,
    #[error("`plugins` is not a list")]
    PluginsNotAList,
    #[error("`plugins` is empty: there is no primary plugin to chain onto")]
    NoPrimaryPlugin,
    #[error("no `{0}`")]
    Missing(&'static str),
    #[error("neither `plugins` nor `type`")]
    NeitherPluginsNorType,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_owned(), source }
}

/// Where to install.
#[derive(Clone, Debug)]
pub struct Target {
    /// The runtime's plugin folder (`/opt/cni/bin` on most nodes).
    pub bin_dir: PathBuf,
    /// The runtime's configuration folder (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's socket, as the node sees it.
    pub agent_socket: String,
}

/// The configuration the runtime reads: the first file of `dir` by name
/// with a configuration's extension.
pub fn primary_conf(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| CONF_EXTENSIONS.iter().any(|c| x == *c)))
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `conf` (a list or a single plugin's configuration) as a list with
/// weft-cni last, its `agentSocket` set; an entry already there is updated.
pub fn chained(conf: &Value, agent_socket: &str) -> Result<Value, ConfProblem> {
    let obj = conf.as_object().ok_or(ConfProblem::NotAnObject)?;
    let mut list = match obj.get("plugins") {
        Some(Value::Array(_)) => obj.clone(),
        Some(_) => return Err(ConfProblem::PluginsNotAList),
        None => single_to_list(obj)?,
    };
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or(ConfProblem::PluginsNotAList)?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
    if plugins.is_empty() {
        return Err(ConfProblem::NoPrimaryPlugin);
    }
    plugins.push(json!({"type": PLUGIN, "agentSocket": agent_socket}));
    Ok(Value::Object(list))
}

/// `conf` without weft-cni in its plugin list.
pub fn unchained(conf: &Value) -> Value {
    let mut conf = conf.clone();
    if let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
    }
    conf
}

/// A single plugin's configuration (`.conf`) as a list of that one plugin.
fn single_to_list(obj: &Map<String, Value>) -> Result<Map<String, Value>, ConfProblem> {
    let mut plugin = obj.clone();
    let version = plugin.remove("cniVersion").ok_or(ConfProblem::Missing("cniVersion"))?;
    let name = plugin.remove("name").ok_or(ConfProblem::Missing("name"))?;
    if !plugin.contains_key("type") {
        return Err(ConfProblem::NeitherPluginsNorType);
    }
    let mut list = Map::new();
    list.insert("cniVersion".into(), version);
    list.insert("name".into(), name);
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    Ok(list)
}

fn read_conf(path: &Path) -> Result<Value, InstallError> {
    let mut text = Vec::new();
    fs::File::open(path).and_then(|f| f.take(MAX_CONF_BYTES).read_to_end(&mut text)).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|source| InstallError::Json { path: path.to_owned(), source })
}

/// Writes `bytes` to `path` through a temporary file in the same folder
/// (whose name no runtime reads) and a rename.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.weft-tmp"));
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Copies `binary` into the plugin folder and chains weft-cni onto the
/// primary configuration, waiting up to `wait` for one to appear (the
/// primary CNI's own DaemonSet may start after weft's). Returns the file
/// written.
pub fn install(target: &Target, binary: &Path, wait: Duration) -> Result<PathBuf, InstallError> {
    let bytes = fs::read(binary).map_err(io(binary))?;
    replace(&target.bin_dir.join(PLUGIN), &bytes, 0o755)?;

    let started = Instant::now();
    let primary = loop {
        if let Some(p) = primary_conf(&target.conf_dir)? {
            break p;
        }
        if started.elapsed() >= wait {
            return Err(InstallError::NoPrimary { dir: target.conf_dir.clone(), waited: wait });
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let conf = read_conf(&primary)?;
    let list = chained(&conf, &target.agent_socket)
        .map_err(|problem| InstallError::Conf { path: primary.clone(), problem })?;
    let out = if primary.extension().is_some_and(|x| x == "conf") {
        primary.with_extension("conflist")
    } else {
        primary.clone()
    };
    if out == primary && list == conf {
        return Ok(out);
    }
    let mut text = serde_json::to_vec_pretty(&list).unwrap_or_default();
    text.push(b'\n');
    replace(&out, &text, 0o644)?;
    if out != primary {
        fs::remove_file(&primary).map_err(io(&primary))?;
    }
    Ok(out)
}

/// Takes weft-cni out of the primary configuration and removes the plugin
/// binary; what is not there is not an error.
pub fn uninstall(target: &Target) -> Result<(), InstallError> {
    if let Some(primary) = primary_conf(&target.conf_dir)? {
        let conf = read_conf(&primary)?;
        let without = unchained(&conf);
        if without != conf {
            let mut text = serde_json::to_vec_pretty(&without).unwrap_or_default();
            text.push(b'\n');
            replace(&primary, &text, 0o644)?;
        }
    }
    match fs::remove_file(target.bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&target.bin_dir.join(PLUGIN))(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs(PathBuf);
    impl Dirs {
        fn new(tag: &str) -> (Self, Target) {
            let root = std::env::temp_dir().join(format!("weft-cni-install-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for d in ["bin", "net.d"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            let t = Target {
                bin_dir: root.join("bin"),
                conf_dir: root.join("net.d"),
                agent_socket: "/var/run/weft/cni.sock".into(),
            };
            (Self(root), t)
        }
    }
    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn plugin_types(v: &Value) -> Vec<&str> {
        v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn a_list_gets_weft_cni_last_once_and_loses_it_on_uninstall() {
        let (dirs, t) = Dirs::new("list");
        let binary = dirs.0.join("weft-cni-built");
        fs::write(&binary, b"\x7fELF plugin").unwrap();
        // As the node's bridge network is written; a later file is not the runtime's.
        let bridge = json!({"cniVersion": "0.4.0", "name": "node", "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.0.0/24"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]});
        fs::write(t.conf_dir.join("10-node.conflist"), bridge.to_string()).unwrap();
        fs::write(t.conf_dir.join("99-other.conflist"), "{}").unwrap();
        fs::write(t.conf_dir.join("00-notes.txt"), "not a configuration").unwrap();

        let out = install(&t, &binary, Duration::ZERO).unwrap();
        assert_eq!(out, t.conf_dir.join("10-node.conflist"));
        let got: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(plugin_types(&got), ["bridge", "portmap", "weft-cni"]);
        assert_eq!(got["plugins"][2]["agentSocket"], "/var/run/weft/cni.sock");
        assert_eq!((&got["cniVersion"], &got["plugins"][0]), (&bridge["cniVersion"], &bridge["plugins"][0]));
        assert_eq!(fs::read(t.bin_dir.join("weft-cni")).unwrap(), b"\x7fELF plugin");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(t.bin_dir.join("weft-cni")).unwrap().permissions().mode() & 0o777, 0o755);

        // Again (a restarted init container, another socket): still once.
        let t2 = Target { agent_socket: "/run/weft/other.sock".into(), ..t.clone() };
        install(&t2, &binary, Duration::ZERO).unwrap();
        let got: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(plugin_types(&got), ["bridge", "portmap", "weft-cni"]);
        assert_eq!(got["plugins"][2]["agentSocket"], "/run/weft/other.sock");
        let mut names: Vec<String> =
            fs::read_dir(&t.conf_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        names.sort();
        assert_eq!(names, ["00-notes.txt", "10-node.conflist", "99-other.conflist"], "no temporary files left");

        uninstall(&t).unwrap();
        let back: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(back, bridge);
        assert!(!t.bin_dir.join("weft-cni").exists());
        uninstall(&t).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_of_the_same_name() {
        let (dirs, t) = Dirs::new("conf");
        let binary = dirs.0.join("b");
        fs::write(&binary, b"x").unwrap();
        let ptp = json!({"cniVersion": "1.0.0", "name": "pods", "type": "ptp", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}});
        fs::write(t.conf_dir.join("10-pods.conf"), ptp.to_string()).unwrap();
        let out = install(&t, &binary, Duration::ZERO).unwrap();
        assert_eq!(out, t.conf_dir.join("10-pods.conflist"));
        assert!(!t.conf_dir.join("10-pods.conf").exists());
        let got: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!((got["cniVersion"].as_str(), got["name"].as_str()), (Some("1.0.0"), Some("pods")));
        assert_eq!(got["plugins"][0], json!({"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}));
        assert_eq!(plugin_types(&got), ["ptp", "weft-cni"]);
    }

    #[test]
    fn no_primary_or_a_bad_one_is_an_error_naming_the_folder_or_file() {
        let (dirs, t) = Dirs::new("bad");
        let binary = dirs.0.join("b");
        fs::write(&binary, b"x").unwrap();
        let e = install(&t, &binary, Duration::from_millis(600)).unwrap_err();
        assert!(matches!(e, InstallError::NoPrimary { .. }), "{e}");
        assert!(e.to_string().contains("net.d") && e.to_string().contains("primary CNI"), "{e}");
        for (text, says) in [
            ("{not json", "key must be a string"),
            (r#"{"cniVersion": "1.0.0", "name": "x", "plugins": 3}"#, "`plugins` is not a list"),
            (r#"{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "weft-cni"}]}"#, "no primary plugin"),
            (r#"{"cniVersion": "1.0.0", "name": "x"}"#, "neither `plugins` nor `type`"),
        ] {
            fs::write(t.conf_dir.join("10-x.conflist"), text).unwrap();
            let e = install(&t, &binary, Duration::ZERO).unwrap_err().to_string();
            assert!(e.contains("10-x.conflist") && e.contains(says), "{text}: {e}");
            assert_eq!(fs::read_to_string(t.conf_dir.join("10-x.conflist")).unwrap(), text, "left as it was");
        }
    }
}
