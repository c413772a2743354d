//! The node's routing for the transparent proxy, and the sysctls the datapath
//! relies on. Everything here acts on the current thread's network namespace.

use std::process::Command;

use weft_ebpf::abi;

use super::{DatapathConfig, DatapathError, Result, attach::sysctl};

/// Runs `ip` with arguments; stdout on success, the command and its stderr on failure.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let out =
        Command::new("ip").args(args).output().map_err(|e| DatapathError::io("running `ip` (install iproute2)", e))?;
    if !out.status.success() {
        return Err(DatapathError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `fwmark <proxy mark>/<mask> lookup <table>`: proxy-bound packets (marked by
/// the datapath, or by the socket hook for node processes) are routed by a
/// table whose only route delivers everything locally, where sk_lookup hands
/// them to the proxy.
pub(crate) fn install(cfg: &DatapathConfig) -> Result<()> {
    let dir = &cfg.sysctl_dir;
    sysctl(dir, "net/ipv4/ip_forward", "1")?;
    sysctl(dir, "net/ipv4/conf/all/rp_filter", "0")?;
    sysctl(dir, "net/ipv4/conf/default/rp_filter", "0")?;

    let mark = format!("{:#x}/{:#x}", abi::MARK_TO_PROXY, abi::MARK_MASK);
    let table = cfg.proxy_route_table.to_string();
    let pref = cfg.proxy_rule_priority.to_string();
    let rules = ip(&["-4", "rule", "show", "pref", &pref])?;
    let wanted = format!("fwmark {mark} lookup {table}");
    if !rules.contains(&wanted) {
        ip(&["-4", "rule", "add", "fwmark", &mark, "lookup", &table, "pref", &pref])?;
    }
    ip(&["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
    Ok(())
}
