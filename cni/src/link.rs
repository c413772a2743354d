//! Finding the host side of a pod's veth: one rtnetlink RTM_GETLINK request
//! in the pod's namespace (the interface's peer index, IFLA_LINK) and one in
//! the node's (the device with that index, checked to point back). No
//! external tools, so the plugin runs wherever the runtime runs it.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// What the kernel says of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`...
    pub kind: Option<String>,
    /// The peer's index (in the peer's namespace), for a veth.
    pub peer_index: Option<u32>,
    /// Set when the peer is in another namespace.
    pub peer_netnsid: Option<i32>,
}

/// Which device.
#[derive(Clone, Copy, Debug)]
pub enum Lookup<'a> {
    Name(&'a str),
    Index(u32),
}

/// Describes a device of the namespace at `netns` (None: the current one).
pub fn link(netns: Option<&Path>, which: Lookup<'_>) -> io::Result<LinkInfo> {
    let sock = match netns {
        Some(path) => socket_in(path)?,
        None => socket()?,
    };
    let (index, name) = match which {
        Lookup::Name(n) => (0, Some(n)),
        Lookup::Index(i) => (i32::try_from(i).map_err(|_| io::Error::other("interface index out of range"))?, None),
    };
    send(&sock, &request(index, name))?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A netlink socket of another namespace: made on a thread that enters it
/// (a socket stays in the namespace it was made in), so the calling thread
/// never moves.
fn socket_in(path: &Path) -> io::Result<OwnedFd> {
    let ns = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall on a valid fd; only this short-lived thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            socket()
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
    })
}

fn request(index: i32, name: Option<&str>) -> Vec<u8> {
    let mut msg = vec![0u8; NLMSG_HDR + IFINFOMSG];
    msg[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    msg[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
    msg[NLMSG_HDR] = libc::AF_UNSPEC as u8;
    msg[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&index.to_ne_bytes());
    if let Some(name) = name {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        let len = 4 + data.len();
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        msg.extend_from_slice(&data);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address of the given sizes.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Route attributes: (type, payload), bounds-checked.
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) {
        let len = len as usize;
        let Some(payload) = b.get(4..len) else { break };
        out.push((ty & 0x3fff, payload)); // without the NESTED/BYTEORDER flags
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

fn c_string(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

fn parse(b: &[u8]) -> io::Result<LinkInfo> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short or malformed netlink answer");
    let len = u32_at(b, 0).ok_or_else(bad)? as usize;
    let msg = b.get(..len).ok_or_else(bad)?;
    match u16_at(msg, 4).ok_or_else(bad)? {
        NLMSG_ERROR => {
            let errno = u32_at(msg, NLMSG_HDR).ok_or_else(bad)? as i32;
            return Err(io::Error::from_raw_os_error(-errno));
        }
        RTM_NEWLINK => {}
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("netlink message type {other}"))),
    }
    let index = u32_at(msg, NLMSG_HDR + 4).ok_or_else(bad)?;
    let mut info = LinkInfo { index, ..Default::default() };
    for (ty, payload) in attributes(msg.get(NLMSG_HDR + IFINFOMSG..).ok_or_else(bad)?) {
        match ty {
            IFLA_IFNAME => info.name = c_string(payload),
            IFLA_LINK => info.peer_index = u32_at(payload, 0),
            IFLA_LINK_NETNSID => info.peer_netnsid = u32_at(payload, 0).map(|v| v as i32),
            IFLA_LINKINFO => {
                info.kind =
                    attributes(payload).into_iter().find(|(t, _)| *t == IFLA_INFO_KIND).map(|(_, k)| c_string(k))
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Why the host side of a pod's interface was not found.
#[derive(Debug, thiserror::Error)]
pub enum HostSideError {
    #[error("interface {ifname} in {}: {error}", .netns.display())]
    PodInterface { ifname: String, netns: std::path::PathBuf, error: io::Error },
    #[error("interface {ifname} in {} ({kind}) has no peer in another namespace: weft-cni needs a veth", .netns.display())]
    NotVeth { ifname: String, netns: std::path::PathBuf, kind: String },
    #[error("the peer of {ifname} (index {peer}): {error}")]
    Peer { ifname: String, peer: u32, error: io::Error },
    #[error(
        "the device with index {peer} here ({host}) is not the peer of {ifname} in {}: is the runtime \
         running the plugin in the node's namespace?",
        .netns.display()
    )]
    NotItsPeer { peer: u32, host: String, ifname: String, netns: std::path::PathBuf },
}

/// The host side of the veth whose pod side is `ifname` in `netns`: the
/// device of the current namespace whose index the pod side names as its
/// peer, and which names the pod side back.
pub fn host_side(netns: &Path, ifname: &str) -> Result<LinkInfo, HostSideError> {
    let pod = link(Some(netns), Lookup::Name(ifname)).map_err(|error| HostSideError::PodInterface {
        ifname: ifname.into(),
        netns: netns.into(),
        error,
    })?;
    let (Some(peer), Some(_)) = (pod.peer_index, pod.peer_netnsid) else {
        return Err(HostSideError::NotVeth {
            ifname: ifname.into(),
            netns: netns.into(),
            kind: pod.kind.unwrap_or_else(|| "unknown kind".into()),
        });
    };
    let host =
        link(None, Lookup::Index(peer)).map_err(|error| HostSideError::Peer { ifname: ifname.into(), peer, error })?;
    if host.kind.as_deref() != Some("veth") || host.peer_index != Some(pod.index) {
        return Err(HostSideError::NotItsPeer { peer, host: host.name, ifname: ifname.into(), netns: netns.into() });
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_answer_is_an_error_not_a_panic() {
        for b in [&[][..], &[255, 0, 0, 0, 16, 0][..], &[20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1][..]] {
            assert!(parse(b).is_err());
        }
        // Attributes whose length runs past the end stop the walk.
        assert!(attributes(&[200, 0, 3, 0, b'x']).is_empty());
        assert!(attributes(&[2, 0, 3, 0]).is_empty());
    }

    #[test]
    fn loopback_is_found_by_name_and_by_index() {
        let lo = link(None, Lookup::Name("lo")).unwrap();
        assert_eq!(lo.name, "lo");
        assert_eq!(link(None, Lookup::Index(lo.index)).unwrap().name, "lo");
        assert_eq!(link(None, Lookup::Name("no-such-dev0")).unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }
}
