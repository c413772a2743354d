//! The parts of the CNI specification (1.0 and 1.1) weft-cni uses: the
//! network configuration on stdin, the previous plugin's result, `CNI_ARGS`,
//! and errors with the specification's codes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;
use serde_json::{Value, json};

/// Versions this plugin speaks: 1.0 and 1.1, and the 0.3/0.4 whose results
/// have the same shape for what weft-cni reads (many primary plugins'
/// configurations still say 0.3.1 or 0.4.0, and a chain has one version).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The first version of the specification with each command that did not
/// exist from the start.
const COMMAND_SINCE: &[(&str, (u32, u32))] = &[("CHECK", (0, 4)), ("STATUS", (1, 1)), ("GC", (1, 1))];

/// The specification's error codes (and ours, from 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot add pods now.
    NotAvailable = 50,
    /// The agent refused or failed (weft's own code).
    Agent = 100,
    /// The pod's interface is not one end of a veth with the other in the
    /// node's namespace (weft's own code).
    NotVeth = 101,
}

/// An error as the runtime gets it (JSON on stdout, non-zero exit).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    /// The error object, in `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg, "details": self.details})
    }
}

/// The network configuration a runtime passes to one plugin of a list.
#[derive(Clone, Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The result of the plugins before this one (ADD, CHECK; DEL when the
    /// runtime cached it).
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// weft's own setting: the agent's socket.
    #[serde(rename = "agentSocket")]
    pub agent_socket: Option<String>,
    /// GC (1.1): the attachments still in use.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Vec<ValidAttachment>,
}

/// One attachment a GC keeps.
#[derive(Clone, Debug, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin and checks the version.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(Code::Decode, "cannot decode the network configuration", e.to_string()))?;
        check_version(&conf.cni_version)?;
        Ok(conf)
    }
}

/// Fails with code 1 for a version this plugin does not speak.
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            "incompatible CNI version",
            format!("cniVersion {v:?}; weft-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// Fails with code 1 for a command that `version` of the specification does
/// not have (CHECK before 0.4.0; STATUS and GC before 1.1.0).
pub fn check_command(command: &str, version: &str) -> Result<(), CniError> {
    let Some((_, since)) = COMMAND_SINCE.iter().find(|(c, _)| *c == command) else {
        return Ok(());
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if have >= *since {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!("{command} needs CNI {}.{}", since.0, since.1),
            format!("the configuration's cniVersion is {version}"),
        ))
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    args.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| {
                CniError::new(Code::InvalidEnvironment, "invalid CNI_ARGS", format!("{kv:?} is not KEY=VALUE"))
            })
        })
        .collect()
}

/// The pod interface in a previous result: its IPv4 address, and the
/// interface names the primary plugin listed outside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    pub ip: Ipv4Addr,
    pub host_side: Vec<String>,
}

#[derive(Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct Interface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct IpConfig {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// Finds the IPv4 address of interface `ifname` in sandbox `netns` in a
/// previous result (an address without an interface index counts when no
/// address names one).
pub fn pod_interface(prev: &Value, netns: &str, ifname: &str) -> Result<PodInterface, CniError> {
    let r: PrevResult = serde_json::from_value(prev.clone())
        .map_err(|e| CniError::new(Code::Decode, "cannot decode prevResult", e.to_string()))?;
    let pod_if =
        r.interfaces.iter().position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()));
    let host_side = r
        .interfaces
        .iter()
        .filter(|i| i.sandbox.as_deref().unwrap_or_default().is_empty())
        .map(|i| i.name.clone())
        .collect();
    let v4 = |c: &IpConfig| c.address.split_once('/').and_then(|(a, _)| a.parse::<Ipv4Addr>().ok());
    let ip = r
        .ips
        .iter()
        .filter(|c| match (c.interface, pod_if) {
            (Some(i), Some(p)) => i == p,
            _ => true,
        })
        .find_map(v4)
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "prevResult has no IPv4 address for the pod",
                format!("no IPv4 address of interface {ifname} in {netns} (weft's datapath is IPv4)"),
            )
        })?;
    Ok(PodInterface { ip, host_side })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptp_and_bridge_results_give_the_pods_address() {
        // As ptp writes it: host veth, then the container's.
        let ptp = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
                           {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/p"}],
            "ips": [{"address": "10.1.1.5/24", "gateway": "10.1.1.1", "interface": 1}]});
        let got = pod_interface(&ptp, "/var/run/netns/p", "eth0").unwrap();
        assert_eq!(got, PodInterface { ip: "10.1.1.5".parse().unwrap(), host_side: vec!["veth1234".into()] });
        // bridge: the bridge, the host veth, the container's; IPv6 first.
        let bridge = json!({"cniVersion": "1.1.0",
            "interfaces": [{"name": "cni0"}, {"name": "vethab"}, {"name": "eth0", "sandbox": "/run/netns/q"}],
            "ips": [{"address": "fd00::5/64", "interface": 2}, {"address": "10.2.0.7/24", "interface": 2}]});
        assert_eq!(pod_interface(&bridge, "/run/netns/q", "eth0").unwrap().ip, Ipv4Addr::new(10, 2, 0, 7));
    }

    #[test]
    fn a_result_without_ipv4_is_an_invalid_configuration() {
        let v6 = json!({"interfaces": [{"name": "eth0", "sandbox": "x"}], "ips": [{"address": "fd00::5/64"}]});
        assert_eq!(pod_interface(&v6, "x", "eth0").unwrap_err().code, Code::InvalidConfig);
        assert_eq!(pod_interface(&json!({"ips": 3}), "x", "eth0").unwrap_err().code, Code::Decode);
    }

    #[test]
    fn versions_and_args_are_checked() {
        assert_eq!(check_version("0.2.0").unwrap_err().code, Code::IncompatibleVersion);
        assert_eq!(check_version("2.0.0").unwrap_err().code, Code::IncompatibleVersion);
        assert!(check_version("1.1.0").is_ok() && check_version("0.4.0").is_ok() && check_version("0.3.1").is_ok());
        assert_eq!(check_command("CHECK", "0.3.1").unwrap_err().code, Code::IncompatibleVersion);
        assert!(check_command("CHECK", "0.4.0").is_ok());
        assert_eq!(check_command("GC", "1.0.0").unwrap_err().code, Code::IncompatibleVersion);
        assert_eq!(check_command("STATUS", "0.4.0").unwrap_err().code, Code::IncompatibleVersion);
        assert!(check_command("STATUS", "1.1.0").is_ok() && check_command("ADD", "0.3.0").is_ok());
        let args = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1").unwrap();
        assert_eq!(args["K8S_POD_NAME"], "web-1");
        assert_eq!(parse_args("A=1;B").unwrap_err().code, Code::InvalidEnvironment);
    }
}
