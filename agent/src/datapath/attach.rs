//! Attaching programs, with every link pinned: a pinned link outlives the
//! agent, and a restarted agent swaps its freshly loaded program into the
//! existing link (atomically) instead of detaching anything.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SkLookup, TcAttachType, links::FdLink,
    tc::TcAttachOptions,
};

use super::{Datapath, DatapathError, Result, sys};
use crate::netns;

/// Which programs a device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRole {
    /// A pod's host-side device: from-container on ingress, to-container on egress.
    Pod,
    /// The node's external device: from-netdev on ingress, to-netdev on egress.
    Node,
}

impl DeviceRole {
    fn programs(self) -> (&'static str, [(&'static str, TcAttachType, &'static str); 2]) {
        match self {
            DeviceRole::Pod => (
                "bpf_lxc",
                [
                    ("from_container", TcAttachType::Ingress, "ingress"),
                    ("to_container", TcAttachType::Egress, "egress"),
                ],
            ),
            DeviceRole::Node => (
                "bpf_netdev",
                [("from_netdev", TcAttachType::Ingress, "ingress"), ("to_netdev", TcAttachType::Egress, "egress")],
            ),
        }
    }
}

const CGROUP_PROGRAMS: &[&str] = &["sock_connect4", "sock_sendmsg4", "sock_recvmsg4", "sock_getpeername4"];

/// The index of a device in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname)
        .map_err(|_| DatapathError::Invalid(format!("interface name {ifname:?} contains NUL")))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DatapathError::Interface { ifname: ifname.to_owned(), source: std::io::Error::last_os_error() });
    }
    Ok(idx)
}

/// The devices that hold `addr` in the current network namespace (the
/// node's external device, found by the node's address when `devices` is not
/// configured), in the kernel's order.
pub fn devices_with_address(addr: std::net::Ipv4Addr) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for (name, a) in ipv4_addresses()? {
        if a == addr && !found.contains(&name) {
            found.push(name);
        }
    }
    Ok(found)
}

/// The IPv4 addresses of the current network namespace but loopback ones:
/// the node's own, as the node's connections may leave from any of them.
pub fn local_addresses() -> std::io::Result<std::collections::BTreeSet<std::net::Ipv4Addr>> {
    Ok(ipv4_addresses()?.into_iter().map(|(_, a)| a).filter(|a| !a.is_loopback()).collect())
}

/// Every (device, IPv4 address) of the current network namespace, in the kernel's order.
fn ipv4_addresses() -> std::io::Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` on success; it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is an element of the list getifaddrs made, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        found.push((name, std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
    }
    // SAFETY: `list` came from getifaddrs and nothing borrowed from it is kept.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Points a pinned link at `program` if the pin exists; returns false if not.
fn update_pinned(pin: &Path, program: impl AsFd) -> Result<bool> {
    match sys::obj_get(pin) {
        Ok(link) => {
            sys::link_update(link.as_fd(), program.as_fd())
                .map_err(|e| DatapathError::io(format!("updating link {}", pin.display()), e))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DatapathError::io(format!("opening link {}", pin.display()), e)),
    }
}

fn pin(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path)
        .map(drop)
        .map_err(|e| DatapathError::io(format!("pinning link {}", path.display()), std::io::Error::other(e)))
}

impl Datapath {
    fn device_pin(&self, ifname: &str, ifindex: u32, dir: &str) -> PathBuf {
        self.links_dir().join(format!("dev:{ifname}@{ifindex}:{dir}"))
    }

    /// Attaches the pod-side programs to a pod's host-side device. Idempotent;
    /// returns the device's ifindex.
    pub fn attach_pod_device(&mut self, ifname: &str) -> Result<u32> {
        self.attach_device(ifname, DeviceRole::Pod)
    }

    /// Attaches the node-device programs (north-south Services, masquerade).
    pub fn attach_node_device(&mut self, ifname: &str) -> Result<u32> {
        self.attach_device(ifname, DeviceRole::Node)
    }

    fn attach_device(&mut self, ifname: &str, role: DeviceRole) -> Result<u32> {
        let idx = ifindex(ifname)?;
        self.remove_stale_device_pins(ifname, Some(idx))?;
        let (object, programs) = role.programs();
        for (program, attach_type, dir) in programs {
            let pin_path = self.device_pin(ifname, idx, dir);
            let prog: &mut SchedClassifier = self
                .object(object)
                .program_mut(program)
                .expect("program in object")
                .try_into()
                .map_err(|e| DatapathError::program(program, e))?;
            let fd = prog.fd().map_err(|e| DatapathError::program(program, e))?;
            if update_pinned(&pin_path, fd)? {
                continue;
            }
            let id = prog
                .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| DatapathError::program(program, e))?;
            let link = prog.take_link(id).map_err(|e| DatapathError::program(program, e))?;
            let link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
                DatapathError::io(format!("link of {program}"), std::io::Error::other(e))
            })?;
            pin(link, &pin_path)?;
        }
        sysctl(&self.cfg.sysctl_dir, &format!("net/ipv4/conf/{ifname}/rp_filter"), "0")?;
        tracing::debug!(ifname, ifindex = idx, ?role, "device attached");
        Ok(idx)
    }

    /// Detaches weft's programs from a device (or forgets them if the device is gone).
    pub fn detach_device(&mut self, ifname: &str) -> Result<()> {
        self.remove_stale_device_pins(ifname, None)
    }

    /// Removes link pins of `ifname`, except those of `keep` (its live ifindex).
    fn remove_stale_device_pins(&self, ifname: &str, keep: Option<u32>) -> Result<()> {
        let prefix = format!("dev:{ifname}@");
        for entry in read_dir(&self.links_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let idx: Option<u32> = rest.split(':').next().and_then(|s| s.parse().ok());
            if keep.is_some() && idx == keep {
                continue;
            }
            fs::remove_file(entry.path())
                .map_err(|e| DatapathError::io(format!("removing {}", entry.path().display()), e))?;
        }
        Ok(())
    }

    /// Devices with weft programs attached: (ifname, ifindex).
    pub fn attached_devices(&self) -> Result<Vec<(String, u32)>> {
        let mut out: Vec<(String, u32)> = read_dir(&self.links_dir())?
            .into_iter()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let rest = name.strip_prefix("dev:")?;
                let (ifname, rest) = rest.split_once('@')?;
                let idx = rest.split(':').next()?.parse().ok()?;
                Some((ifname.to_owned(), idx))
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Pins whose device no longer exists (a pod went away while the agent
    /// was down) are removed.
    pub fn sweep_devices(&mut self) -> Result<()> {
        for (ifname, idx) in self.attached_devices()? {
            if ifindex(&ifname).ok() != Some(idx) {
                self.remove_stale_device_pins(&ifname, None)?;
            }
        }
        Ok(())
    }

    pub(super) fn attach_sk_lookup(&mut self) -> Result<()> {
        let pin_path = self.links_dir().join("sk_lookup");
        let prog: &mut SkLookup = self
            .object("bpf_sock")
            .program_mut("proxy_sk_lookup")
            .expect("program in object")
            .try_into()
            .map_err(|e| DatapathError::program("proxy_sk_lookup", e))?;
        let fd = prog.fd().map_err(|e| DatapathError::program("proxy_sk_lookup", e))?;
        if update_pinned(&pin_path, fd)? {
            return Ok(());
        }
        let ns = netns::current().map_err(|e| DatapathError::io("opening the network namespace", e))?;
        let id = prog.attach(ns).map_err(|e| DatapathError::program("proxy_sk_lookup", e))?;
        let link: FdLink = prog.take_link(id).map_err(|e| DatapathError::program("proxy_sk_lookup", e))?.into();
        pin(link, &pin_path)
    }

    pub(super) fn attach_cgroup(&mut self) -> Result<()> {
        let Some(cgroup) = self.cfg.cgroup.clone() else {
            for name in CGROUP_PROGRAMS {
                let p = self.links_dir().join(name);
                if p.exists() {
                    fs::remove_file(&p).map_err(|e| DatapathError::io(format!("removing {}", p.display()), e))?;
                }
            }
            return Ok(());
        };
        for name in CGROUP_PROGRAMS {
            let pin_path = self.links_dir().join(name);
            let prog: &mut CgroupSockAddr = self
                .object("bpf_sock")
                .program_mut(name)
                .expect("program in object")
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            let fd = prog.fd().map_err(|e| DatapathError::program(name, e))?;
            if update_pinned(&pin_path, fd)? {
                continue;
            }
            let dir = fs::File::open(&cgroup)
                .map_err(|e| DatapathError::io(format!("opening cgroup {}", cgroup.display()), e))?;
            let id = prog
                .attach(dir, CgroupAttachMode::Single) // bpf_link attachments always coexist
                .map_err(|e| DatapathError::program(name, e))?;
            let link = prog.take_link(id).map_err(|e| DatapathError::program(name, e))?;
            let link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
                DatapathError::io(format!("link of {name}"), std::io::Error::other(e))
            })?;
            pin(link, &pin_path)?;
        }
        Ok(())
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    fs::read_dir(dir)
        .and_then(|it| it.collect())
        .map_err(|e| DatapathError::io(format!("reading {}", dir.display()), e))
}

/// Sets a sysctl of the current thread's network namespace, below `dir`
/// (`/proc/sys` or a writable mount of it): left alone when it already has
/// `value`, so a read-only /proc/sys is no obstacle then.
pub(super) fn sysctl(dir: &Path, key: &str, value: &str) -> Result<()> {
    let path = dir.join(key);
    if fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(&path, value).map_err(|e| DatapathError::io(format!("setting {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_device_holding_an_address_is_found_by_it() {
        assert_eq!(super::devices_with_address(std::net::Ipv4Addr::LOCALHOST).unwrap(), ["lo"]);
        assert!(super::devices_with_address(std::net::Ipv4Addr::new(192, 0, 2, 77)).unwrap().is_empty());
    }
}
