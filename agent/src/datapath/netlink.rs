//! Netlink queries in the current thread's network namespace, instead of
//! starting processes or reading `/proc` tables:
//! - route lookups over rtnetlink (one `RTM_GETROUTE` request): what
//!   `ip route get ADDR` answers, without a process for every pod on every
//!   change;
//! - the listening TCP sockets over sock_diag (one `SOCK_DIAG_BY_FAMILY`
//!   dump of LISTEN sockets only), which walks the kernel's listening hash
//!   only, where `/proc/net/tcp` walks every established connection of the
//!   machine on every read.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u32 = 10;
/// inet_diag_req_v2: family, protocol, ext, pad, states, then the 48-byte
/// inet_diag_sockid.
const INET_DIAG_REQ: usize = 56;
/// Where a reply's inet_diag_msg keeps the source port (big-endian, in its
/// sockid) and the socket's inode.
const DIAG_SPORT: usize = 4;
const DIAG_INODE: usize = 68;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// nlmsghdr, then rtmsg.
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// The device the node routes `ip` through (its name), or None when there
/// is no route (the kernel answers with an error, as `ip route get` fails).
pub fn route_device(ip: Ipv4Addr) -> io::Result<Option<String>> {
    let sock = socket(libc::NETLINK_ROUTE)?;
    let mut req = [0u8; NLMSG_HDR + RTMSG + 8];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[NLMSG_HDR] = libc::AF_INET as u8;
    req[NLMSG_HDR + 1] = 32; // dst_len
    let attr = NLMSG_HDR + RTMSG;
    req[attr..attr + 2].copy_from_slice(&8u16.to_ne_bytes());
    req[attr + 2..attr + 4].copy_from_slice(&RTA_DST.to_ne_bytes());
    req[attr + 4..attr + 8].copy_from_slice(&ip.octets());
    send(&sock, &req)?;
    let mut buf = [0u8; 4096];
    // SAFETY: receives into the buffer, at most its length.
    let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..got as usize];
    match parse_reply(msg)? {
        Some(index) => Ok(interface_name(index)),
        None => Ok(None),
    }
}

/// The listening TCP (IPv4) sockets of the current thread's network
/// namespace: (port, socket inode) each, as `/proc/net/tcp` lists them with
/// state 0A.
pub fn tcp_listeners() -> io::Result<Vec<(u16, u64)>> {
    let sock = socket(libc::NETLINK_SOCK_DIAG)?;
    let mut req = [0u8; NLMSG_HDR + INET_DIAG_REQ];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[NLMSG_HDR] = libc::AF_INET as u8;
    req[NLMSG_HDR + 1] = libc::IPPROTO_TCP as u8;
    req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    send(&sock, &req)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receives into the buffer, at most its length.
        let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag dump ended without NLMSG_DONE"));
        }
        if parse_listeners(&buf[..got as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// Adds the (port, inode) of each socket in one read of a sock_diag dump;
/// true once the dump's end is in it.
fn parse_listeners(mut msgs: &[u8], out: &mut Vec<(u16, u64)>) -> io::Result<bool> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    while !msgs.is_empty() {
        let len = u32_at(msgs, 0).ok_or_else(bad)? as usize;
        if len < NLMSG_HDR {
            return Err(bad());
        }
        let msg = msgs.get(..len).ok_or_else(bad)?;
        match u16_at(msg, 4).ok_or_else(bad)? {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(msg, NLMSG_HDR).ok_or_else(bad)? as i32;
                return Err(io::Error::from_raw_os_error(code.checked_neg().ok_or_else(bad)?));
            }
            SOCK_DIAG_BY_FAMILY => {
                let diag = NLMSG_HDR;
                let port = msg.get(diag + DIAG_SPORT..diag + DIAG_SPORT + 2).ok_or_else(bad)?;
                let inode = u32_at(msg, diag + DIAG_INODE).ok_or_else(bad)?;
                out.push((u16::from_be_bytes([port[0], port[1]]), u64::from(inode)));
            }
            _ => {}
        }
        msgs = msgs.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    Ok(false)
}

fn socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one request to the kernel.
fn send(sock: &OwnedFd, req: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl addresses the kernel.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: buffer and length are the slice's own.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The output interface index of the kernel's answer; None when the kernel
/// says there is no route.
fn parse_reply(msg: &[u8]) -> io::Result<Option<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed rtnetlink reply");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let msg = msg.get(..len).ok_or_else(bad)?;
    match u16_at(msg, 4).ok_or_else(bad)? {
        NLMSG_ERROR => {
            let code = u32_at(msg, NLMSG_HDR).ok_or_else(bad)? as i32;
            // 0 would be an acknowledgement, which was not asked for.
            if code == 0 { Err(bad()) } else { Ok(None) }
        }
        RTM_NEWROUTE => {
            let mut at = NLMSG_HDR + RTMSG;
            while let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
                let alen = usize::from(alen);
                if alen < 4 {
                    return Err(bad());
                }
                if atype == RTA_OIF && alen >= 8 {
                    return u32_at(msg, at + 4).map(Some).ok_or_else(bad);
                }
                at += alen.div_ceil(4) * 4;
            }
            Ok(None)
        }
        _ => Err(bad()),
    }
}

fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into the buffer.
    let c = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_address_is_routed_through_lo_as_ip_route_get_says() {
        assert_eq!(route_device(Ipv4Addr::LOCALHOST).unwrap().as_deref(), Some("lo"));
    }

    #[test]
    fn a_listening_socket_is_found_with_its_port_and_inode_and_a_connected_one_is_not() {
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // stat follows the descriptor's link to the socket's own inode.
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap().ino();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let found = tcp_listeners().unwrap();
        assert!(found.contains(&(port, inode)), "{port}/{inode} not in {found:?}");
        // The accepted side of the connection has the listener's port too.
        assert_eq!(found.iter().filter(|&&(p, _)| p == port).count(), 1, "{found:?}");
        let client_port = c.local_addr().unwrap().port();
        assert!(!found.iter().any(|&(p, _)| p == client_port), "a connected socket was listed");
    }

    #[test]
    fn sock_diag_replies_are_read_within_their_bounds() {
        let mut out = Vec::new();
        // One socket (port 8080, inode 77), then the end of the dump.
        let mut m = vec![0u8; NLMSG_HDR + 72];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m[NLMSG_HDR + DIAG_SPORT..NLMSG_HDR + DIAG_SPORT + 2].copy_from_slice(&8080u16.to_be_bytes());
        m[NLMSG_HDR + DIAG_INODE..NLMSG_HDR + DIAG_INODE + 4].copy_from_slice(&77u32.to_ne_bytes());
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(!parse_listeners(&m, &mut out).unwrap());
        assert!(parse_listeners(&[m.clone(), done].concat(), &mut out).unwrap());
        assert_eq!(out, vec![(8080, 77), (8080, 77)]);
        // A message shorter than its inode, a length past the read, a
        // length under a header: refused, not read.
        let mut short = m.clone();
        short[0..4].copy_from_slice(&40u32.to_ne_bytes());
        assert!(parse_listeners(&short[..40], &mut out).is_err());
        assert!(parse_listeners(&m[..60], &mut out).is_err());
        let mut tiny = m.clone();
        tiny[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse_listeners(&tiny, &mut out).is_err());
        // An error reply names the errno.
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-13i32).to_ne_bytes());
        assert_eq!(parse_listeners(&err, &mut out).unwrap_err().raw_os_error(), Some(13));
    }

    #[test]
    fn replies_are_read_within_their_bounds() {
        // An error reply (ENETUNREACH): no route.
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-101i32).to_ne_bytes());
        assert_eq!(parse_reply(&err).unwrap(), None);
        // A route with RTA_OIF 7 after another attribute.
        let mut r = vec![0u8; 44];
        r[0..4].copy_from_slice(&44u32.to_ne_bytes());
        r[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        r[28..30].copy_from_slice(&8u16.to_ne_bytes());
        r[30..32].copy_from_slice(&RTA_DST.to_ne_bytes());
        r[36..38].copy_from_slice(&8u16.to_ne_bytes());
        r[38..40].copy_from_slice(&RTA_OIF.to_ne_bytes());
        r[40..44].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse_reply(&r).unwrap(), Some(7));
        // Lengths that point past the message are refused, not read.
        r[0..4].copy_from_slice(&400u32.to_ne_bytes());
        assert!(parse_reply(&r).is_err());
        r[0..4].copy_from_slice(&44u32.to_ne_bytes());
        r[36..38].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_reply(&r).is_err());
        assert!(parse_reply(&[1, 2]).is_err());
    }
}
