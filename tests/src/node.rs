//! Driving a lab node's datapath from the test process: open it inside the
//! node's namespace, register the lab's pods, identities and devices.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::Ipv4Addr,
    os::unix::net::UnixListener,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use weft_agent::{
    datapath::{Datapath, DatapathConfig, EndpointEntry, IpcacheEntry},
    identity::{self, LabelSet},
    netns::{self, NetnsGuard},
};
use weft_cni::proto::{self, Answer, PodRef, Request};
use weft_ebpf::abi::{self, Event};

use crate::{
    cni,
    lab::{CNI_NETWORK, Lab, Pod, PodNetwork},
};

/// A node's datapath, opened by the test process.
pub struct LabNode {
    pub idx: usize,
    pub netns: String,
    pub dp: Datapath,
    pub events: RingBuf<MapData>,
}

impl LabNode {
    /// Loads the datapath into node `idx` with the lab's defaults, adjusted by `tweak`.
    pub fn open(lab: &Lab, idx: usize, tweak: impl FnOnce(&mut DatapathConfig)) -> anyhow::Result<Self> {
        let node = lab.node(idx);
        let mut cfg = DatapathConfig::new(node.ip);
        cfg.bpffs_dir = node.bpffs_dir.clone();
        cfg.cgroup = Some(node.cgroup.clone());
        cfg.native_cidr = Some((Ipv4Addr::new(10, 0, 0, 0), 8));
        cfg.masquerade = true;
        tweak(&mut cfg);
        let mut dp = {
            let _g = NetnsGuard::enter(&netns::named(&node.netns))?;
            Datapath::open(cfg)?
        };
        let events = dp.take_events().expect("fresh datapath has its ring buffer");
        Ok(Self { idx, netns: node.netns.clone(), dp, events })
    }

    /// Runs `f` on the datapath with the thread inside the node's namespace
    /// (needed for anything that names devices or touches routing).
    pub fn with<T>(&mut self, f: impl FnOnce(&mut Datapath) -> T) -> T {
        let _g = NetnsGuard::enter(&netns::named(&self.netns)).expect("node namespace exists");
        f(&mut self.dp)
    }

    /// Registers the lab's view: this node's pods as endpoints on their
    /// devices, every pod and node address in the ipcache, the node device.
    pub fn install_lab(&mut self, lab: &Lab) -> anyhow::Result<()> {
        let ids = pod_identities(lab);
        let cni_socket = match lab.pod_network {
            PodNetwork::Chain => {
                let path = lab.run_dir.join(format!("{}-test-cni.sock", lab.node(self.idx).name));
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)?;
                listener.set_nonblocking(true)?;
                Some((listener, path))
            }
            _ => None,
        };
        for pod in &lab.pods {
            let node_ip = lab.node(pod.node).ip;
            self.dp.upsert_ipcache(&IpcacheEntry {
                addr: pod.ip,
                prefix_len: 32,
                identity: ids(pod),
                node_addr: Some(node_ip),
                local: pod.node == self.idx,
                node: false,
            })?;
            if pod.node == self.idx {
                let ifindex = match &cni_socket {
                    Some((listener, path)) => self.attach_through_weft_cni(pod, listener, path)?,
                    None => self.with(|dp| dp.attach_pod_device(&pod.host_if))?,
                };
                let ep_id = self.dp.endpoint_id_for(pod.ip);
                self.dp.upsert_endpoint(&EndpointEntry {
                    addr: pod.ip,
                    ifindex,
                    identity: ids(pod),
                    ep_id,
                    policy_ingress: false,
                    policy_egress: false,
                })?;
            }
        }
        for (i, node) in lab.nodes.iter().enumerate() {
            self.dp.upsert_ipcache(&IpcacheEntry {
                addr: node.ip,
                prefix_len: 32,
                identity: if i == self.idx { abi::ID_HOST } else { abi::ID_REMOTE_NODE },
                node_addr: Some(node.ip),
                local: false,
                node: true,
            })?;
        }
        let dev = lab.node(self.idx).dev.clone();
        self.with(|dp| dp.attach_node_device(&dev))?;
        Ok(())
    }

    /// weft-cni's ADD for a local pod of a [`PodNetwork::Chain`] lab (ptp's
    /// ran when the lab was built), with the test process as the agent
    /// behind `listener` (at `path`): the datapath is attached to the device
    /// weft-cni names, then weft-cni is answered. Returns the device's index.
    fn attach_through_weft_cni(
        &mut self,
        pod: &Pod,
        listener: &UnixListener,
        path: &std::path::Path,
    ) -> anyhow::Result<u32> {
        let prev = pod.ptp_result.as_ref().ok_or_else(|| anyhow::anyhow!("pod {}: no ptp result", pod.name))?;
        let (node_ns, sandbox) = (self.netns.clone(), crate::lab::sandbox(pod, &pod.namespace, &pod.name));
        std::thread::scope(|s| {
            let plugin = s.spawn(|| cni::add_weft_cni(&node_ns, &sandbox, CNI_NETWORK, prev, path));
            let deadline = Instant::now() + Duration::from_secs(30);
            let conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock && !plugin.is_finished() && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => anyhow::bail!("weft-cni ADD {}: no request ({e})", pod.name),
                }
            };
            conn.set_nonblocking(false)?;
            let a = match proto::read_message::<Request>(&conn)? {
                Request::Add(a) => a,
                other => anyhow::bail!("weft-cni ADD {}: the agent got {other:?}", pod.name),
            };
            let wanted = PodRef { namespace: pod.namespace.clone(), name: pod.name.clone() };
            anyhow::ensure!(
                (&a.pod, a.ip, a.host_ifname.as_str()) == (&wanted, pod.ip, pod.host_if.as_str()),
                "weft-cni ADD {}: the agent was asked for {a:?}",
                pod.name
            );
            let ifindex = self.with(|dp| dp.attach_pod_device(&a.host_ifname))?;
            let answer = match ifindex == a.host_ifindex {
                true => Answer::ok(),
                false => Answer::failed(format!("{} is index {ifindex}, not {}", a.host_ifname, a.host_ifindex), false),
            };
            proto::write_message(&conn, &answer)?;
            plugin.join().map_err(|_| anyhow::anyhow!("weft-cni runner panicked"))?.map_err(anyhow::Error::msg)?;
            Ok(ifindex)
        })
    }

    /// Every record currently in the ring buffer.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(ev) = Event::from_bytes(&item) {
                out.push(ev);
            }
        }
        out
    }
}

/// The identity of each lab pod, computed as the agent does.
pub fn pod_identities(lab: &Lab) -> impl Fn(&Pod) -> u32 + '_ {
    let sets: BTreeSet<LabelSet> = lab.pods.iter().map(label_set).collect();
    let ids = identity::assign(&sets);
    move |pod| ids[&label_set(pod)]
}

fn label_set(pod: &Pod) -> LabelSet {
    let labels = identity::pod_labels(&pod.labels.iter().cloned().collect(), None);
    LabelSet::new(&pod.namespace, labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}
