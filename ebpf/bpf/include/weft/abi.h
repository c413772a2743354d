/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Everything that crosses the kernel/user boundary, defined once.
 *
 * Shared with: ebpf/src/abi.rs (the #[repr(C)] mirrors; its layout tests pin
 * every size and offset below). Change both together and bump WEFT_ABI_VERSION.
 *
 * Addresses and ports are in network byte order unless a field says otherwise.
 * The datapath is IPv4-only in this ABI version.
 */
#ifndef WEFT_ABI_H
#define WEFT_ABI_H

#include <linux/types.h>

#define WEFT_ABI_VERSION 2

/* ---- Event types: Cilium's monitor numbering, so Hubble's CiliumEventType.type matches. */
#define WEFT_EV_DROP 1
#define WEFT_EV_TRACE 4
#define WEFT_EV_POLICY 5
#define WEFT_EV_SOCK 7 /* socket-level translation (node processes, cgroup hooks) */

/* ---- Trace observation points: Hubble's TraceObservationPoint numbering. */
#define WEFT_OBS_TO_PROXY 1
#define WEFT_OBS_TO_HOST 2
#define WEFT_OBS_TO_STACK 3
#define WEFT_OBS_FROM_ENDPOINT 5
#define WEFT_OBS_FROM_PROXY 6
#define WEFT_OBS_FROM_HOST 7
#define WEFT_OBS_FROM_STACK 8
#define WEFT_OBS_FROM_NETWORK 10
#define WEFT_OBS_TO_NETWORK 11
#define WEFT_OBS_TO_ENDPOINT 101

/* ---- Trace reasons: Hubble's TraceReason numbering. */
#define WEFT_REASON_UNKNOWN 0
#define WEFT_REASON_NEW 1
#define WEFT_REASON_ESTABLISHED 2
#define WEFT_REASON_REPLY 3
#define WEFT_REASON_RELATED 4

/* ---- Drop reasons: Hubble's DropReason numbering (Cilium returns them negated). */
#define WEFT_DROP_INVALID_SOURCE_IP 132
#define WEFT_DROP_POLICY_DENIED 133
#define WEFT_DROP_INVALID_PACKET 134
#define WEFT_DROP_CT_INVALID_HDR 135
#define WEFT_DROP_UNKNOWN_L3 139
#define WEFT_DROP_WRITE_ERROR 141
#define WEFT_DROP_UNKNOWN_L4 142
#define WEFT_DROP_CT_CREATE_FAILED 155
#define WEFT_DROP_FRAG_NOSUPPORT 157
#define WEFT_DROP_NO_SERVICE 158
#define WEFT_DROP_NO_FIB 169
#define WEFT_DROP_PROXY_LOOKUP_FAILED 178
#define WEFT_DROP_PROXY_SET_FAILED 179
#define WEFT_DROP_POLICY_DENY 181

/* ---- Policy: match types (Cilium/Hubble policy_match_type numbering): which
 * parts of the entry that decided were specific (peer identity, protocol, port). */
#define WEFT_MATCH_NONE 0
#define WEFT_MATCH_L3_ONLY 1    /* this peer, any protocol and port */
#define WEFT_MATCH_L3_L4 2      /* this peer, this port (or range) */
#define WEFT_MATCH_L4_ONLY 3    /* any peer, this port (or range) */
#define WEFT_MATCH_ALL 4        /* any peer, anything */
#define WEFT_MATCH_L3_PROTO 5   /* this peer, any port of a protocol */
#define WEFT_MATCH_PROTO_ONLY 6 /* any peer, any port of a protocol */

/* Policy actions, in the policy map and in policy-verdict events (subtype). */
#define WEFT_POLICY_ALLOW 1
#define WEFT_POLICY_DENY 2

/* Traffic direction, from the local endpoint's point of view (Hubble numbering). */
#define WEFT_DIR_INGRESS 1
#define WEFT_DIR_EGRESS 2

/* ---- Reserved identities (Cilium numbering). Pod identities are >= WEFT_IDENTITY_MIN_POD. */
#define WEFT_ID_UNKNOWN 0
#define WEFT_ID_HOST 1
#define WEFT_ID_WORLD 2
#define WEFT_ID_REMOTE_NODE 6
#define WEFT_IDENTITY_MIN_POD 65536
/* Prefixes named by policies (ipBlock), outside the cluster: [MIN_CIDR, MIN_POD). */
#define WEFT_IDENTITY_MIN_CIDR 16384

/* ---- Event emission levels (weft_config.emit_level), changeable at run time. */
#define WEFT_EMIT_OFF 0
#define WEFT_EMIT_CONN 1 /* first packet of a connection, and TCP flag changes */
#define WEFT_EMIT_ALL 2  /* every packet */

/* ---- weft_event.flags */
#define WEFT_EVF_XLATED_DST (1 << 0) /* orig_addr/orig_port hold the destination before DNAT */
#define WEFT_EVF_XLATED_SRC (1 << 1) /* nat_addr/nat_port hold the source after SNAT */
#define WEFT_EVF_REPLY (1 << 2)      /* packet belongs to the reply direction */
#define WEFT_EVF_REVNAT (1 << 3)     /* orig_addr/orig_port hold the source before reverse NAT */
#define WEFT_EVF_AUDIT (1 << 4)      /* policy verdict: audited, not enforced */

/* One record per decision, written into the weft_events ring buffer.
 * type selects the meaning of subtype: drop reason, observation point, or policy action. */
struct weft_event {
	__u64 ts_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u8 type;     /* WEFT_EV_* */
	__u8 subtype;  /* drop: WEFT_DROP_*; trace/sock: WEFT_OBS_*; policy: WEFT_POLICY_* */
	__u8 reason;   /* WEFT_REASON_* */
	__u8 flags;    /* WEFT_EVF_* */
	__u16 src_ep;  /* local endpoint id of the source, 0 if not local */
	__u16 dst_ep;  /* local endpoint id of the destination, 0 if not local */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex; /* device the packet was seen on (0 for socket hooks) */
	__u32 saddr;   /* packet addresses as seen after this hook's translation */
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 policy_match; /* policy events: WEFT_MATCH_* */
	__u8 direction;    /* WEFT_DIR_*: policy verdicts, and drops policy decided */
	__u32 orig_addr;   /* see WEFT_EVF_XLATED_DST / WEFT_EVF_REVNAT */
	__u16 orig_port;
	__u16 proxy_port;  /* host byte order; to-proxy traces, and policy verdicts that send the
			    * connection through the proxy */
	__u32 nat_addr;    /* see WEFT_EVF_XLATED_SRC */
	__u16 nat_port;
	__u16 drop_line;   /* source line of a drop, for debugging */
	__u32 pkt_len;     /* original packet length */
	__u32 rule_id;     /* policy verdicts: the rule that decided (0: none matched) */
};

/* Per-CPU counters in weft_event_stats (index = WEFT_STAT_*). */
#define WEFT_STAT_EMITTED 0 /* records written to the ring buffer */
#define WEFT_STAT_LOST 1    /* records lost: ring buffer reservation failed */
#define WEFT_STAT_MAX 2

/* ---- Packet marks, inside WEFT_MARK_MASK so other users of the mark keep their bits.
 * The agent installs `ip rule fwmark WEFT_MARK_TO_PROXY/WEFT_MARK_MASK lookup <table>`
 * with `local 0.0.0.0/0 dev lo` in that table: marked packets are delivered locally,
 * where the sk_lookup program hands them to the proxy's listener. */
#define WEFT_MARK_MASK 0x0F00
#define WEFT_MARK_TO_PROXY 0x0A00
#define WEFT_MARK_SEEN 0x0B00 /* already handled by a weft program on this node */
/* The node's proxy's upstream connections: Envoy sets it on every upstream
 * socket (SO_MARK, the bootstrap's cluster_manager.upstream_bind_config).
 * The host policy's egress does not judge them (the pods they reach still
 * do); setting SO_MARK takes CAP_NET_ADMIN, as changing weft's tc programs does. */
#define WEFT_MARK_FROM_PROXY 0x0C00

/* ---- weft_config: one entry, written by the agent, read by every program. */
#define WEFT_CFG_ALLOW_HOST_INGRESS (1 << 0) /* the node itself may always reach local pods */
#define WEFT_CFG_MASQUERADE (1 << 1)         /* SNAT pod traffic leaving the native-routing CIDR */
#define WEFT_CFG_SOCK_LB_PODS (1 << 2)       /* socket hooks also translate pods' connects (no per-packet NAT) */

struct weft_config {
	__u32 emit_level;   /* WEFT_EMIT_* */
	__u32 flags;        /* WEFT_CFG_* */
	__u64 netns_cookie; /* socket hooks act only on sockets of this network namespace */
	__u32 node_ip;      /* the node's address on its external device */
	__u32 _reserved;
	__u32 native_cidr;  /* destinations inside it are never masqueraded */
	__u8 native_cidr_len;
	__u8 host_policy;   /* WEFT_EP_POLICY_*: a host policy selects this node (default-deny) */
	__u16 _pad2;
	__u16 nat_port_min; /* host byte order: SNAT port range */
	__u16 nat_port_max;
	__u32 _pad3;
};

/* ---- Services. Slot 0 of a frontend holds the service; slots 1..count its backends. */
#define WEFT_SVC_L7 (1 << 0)       /* redirect to proxy_port instead of DNAT */
#define WEFT_SVC_NODEPORT (1 << 1) /* frontend on a node address: SNAT when the backend is remote */
#define WEFT_SVC_EXTERNAL (1 << 2) /* LoadBalancer or external IP: SNAT when the backend is remote */

struct weft_svc_key {
	__u32 addr;
	__u16 port;
	__u16 slot;  /* host byte order */
	__u8 proto;
	__u8 _pad[3];
};

struct weft_svc_val {
	__u32 backend_id; /* slot > 0: the backend; slot 0: the service id */
	__u16 count;      /* slot 0: number of backend slots */
	__u16 proxy_port; /* slot 0, WEFT_SVC_L7: host byte order */
	__u8 flags;       /* slot 0: WEFT_SVC_* */
	__u8 _pad[3];
};

struct weft_backend {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 flags;
};

/* ---- Endpoints: pods on this node, keyed by their IPv4 address. */
#define WEFT_EP_POLICY_INGRESS (1 << 0) /* a policy selects this pod: default-deny ingress */
#define WEFT_EP_POLICY_EGRESS (1 << 1)  /* an egress policy selects this pod: default-deny egress */

/* The node itself as a policy endpoint (host policies): its entries in
 * weft_policy have this endpoint id (pods get 1 and up); whether a direction
 * is under default-deny is weft_config.host_policy. */
#define WEFT_HOST_EP_ID 0

struct weft_endpoint {
	__u32 ifindex;  /* host-side device of the pod */
	__u32 identity;
	__u16 ep_id;
	__u8 flags;     /* WEFT_EP_* */
	__u8 _pad;
};

/* ---- ipcache: prefix -> identity of any peer, local or remote. */
struct weft_ipcache_key {
	__u32 prefixlen; /* LPM trie: bits that follow, here 0..32 */
	__u32 addr;
};

#define WEFT_IPC_LOCAL (1 << 0) /* a pod on this node */
#define WEFT_IPC_NODE (1 << 1)  /* a node address */

struct weft_ipcache_val {
	__u32 identity;
	__u32 node_addr; /* for pods: the address of the node that hosts them */
	__u8 flags;      /* WEFT_IPC_* */
	__u8 _pad[3];
};

/* ---- Policy: allow/deny entries per local endpoint and direction, in an LPM
 * trie. ep_id, direction and identity are always matched (identity 0 = any
 * peer, looked up separately); protocol and port are the prefix: an entry for
 * any protocol ends before `proto` (WEFT_POLICY_PREFIX_FIXED), one for every
 * port of a protocol ends before `dport` (WEFT_POLICY_PREFIX_PROTO), a port
 * range is one entry per aligned power-of-two block (prefix up to
 * WEFT_POLICY_PREFIX_FULL). */
#define WEFT_POLICY_PREFIX_FIXED 72
#define WEFT_POLICY_PREFIX_PROTO 80
#define WEFT_POLICY_PREFIX_FULL 96

struct weft_policy_key {
	__u32 prefixlen; /* LPM trie: bits of what follows that must match */
	__u16 ep_id;
	__u8 direction;  /* WEFT_DIR_* */
	__u8 _pad0;
	__u32 identity;  /* 0 = any peer */
	__u8 _pad1;
	__u8 proto;
	__u16 dport;     /* network byte order */
};

struct weft_policy_val {
	__u8 action;      /* WEFT_POLICY_* */
	__u8 prefixlen;   /* the key's prefixlen: ranks this entry against the other lookup's */
	__u16 proxy_port; /* host byte order; set: allowed through the node's proxy on this port */
	__u32 rule_id;    /* opaque, lets userspace name the rule that matched */
};

/* ---- Connection tracking. The key is the tuple of the packet that opened the
 * connection, as it looks after any DNAT (so one entry serves both directions). */
#define WEFT_CT_SCOPE_CONN 0 /* weft_ct: connection state */
#define WEFT_CT_SCOPE_SVC 1  /* weft_lb: service translation of the pre-DNAT tuple */

struct weft_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 scope; /* WEFT_CT_SCOPE_* */
	__u16 _pad;
};

#define WEFT_CT_DNAT (1 << 0)        /* replies get rev_addr:rev_port as source */
#define WEFT_CT_SNAT (1 << 1)        /* replies get snat_addr:snat_port as destination */
#define WEFT_CT_PROXY (1 << 2)       /* redirected to the local proxy */
#define WEFT_CT_INGRESS_OK (1 << 3)  /* ingress policy allowed delivery into a local pod */
#define WEFT_CT_NODEPORT (1 << 4)    /* north-south: replies leave through the node device */
#define WEFT_CT_CLOSING (1 << 5)     /* FIN or RST seen */
#define WEFT_CT_FROM_HOST (1 << 6)   /* opened by a process of the node */
#define WEFT_CT_EGRESS_OK (1 << 7)   /* egress policy allowed the local pod that opened it */

struct weft_ct_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets_orig;
	__u64 packets_reply;
	__u64 bytes_orig;
	__u64 bytes_reply;
	__u32 rev_addr;   /* WEFT_CT_DNAT: original destination (the frontend) */
	__u16 rev_port;
	__u16 proxy_port; /* WEFT_CT_PROXY: host byte order */
	__u32 snat_addr;  /* WEFT_CT_SNAT: original source (the client) */
	__u16 snat_port;
	__u8 flags;       /* WEFT_CT_* */
	__u8 seen_orig;   /* TCP flags seen in the original direction */
	__u8 seen_reply;  /* TCP flags seen in the reply direction */
	__u8 _pad[3];
	__u32 src_identity;
};

/* weft_lb: pre-DNAT tuple -> the backend chosen for the connection. */
struct weft_lb_entry {
	__u64 last_seen_ns;
	__u32 backend_id;
	__u32 backend_addr;
	__u16 backend_port;
	__u16 svc_port;   /* frontend port, to find the service again */
	__u32 nat_addr;   /* SNAT source (node address) when set */
	__u16 nat_port;
	__u8 flags;       /* WEFT_CT_* copied to the connection */
	__u8 _pad;
};

/* ---- Socket-level load-balancing for node processes: cookie -> frontend. */
struct weft_sock_rev {
	__u32 frontend_addr;
	__u16 frontend_port;
	__u16 _pad;
	__u32 backend_addr;
	__u16 backend_port;
	__u16 _pad2;
};

#endif /* WEFT_ABI_H */
