/* SPDX-License-Identifier: Apache-2.0 */
/* Policy in both directions (lib/policy.h via lib/lxc.h): ingress at delivery
 * into a pod, egress where the pod's traffic leaves it, after Service
 * translation; redirects to the proxy for L7 rules. */
#include "unit.h"
#include "lib/lxc.h"

#define SERVER IP4(10, 1, 2, 11)
#define PEER_A IP4(10, 1, 1, 11)
#define PEER_B IP4(10, 1, 1, 12)
#define REMOTE IP4(10, 1, 3, 11)
#define NODE IP4(192, 168, 50, 2)
#define VIP IP4(10, 96, 0, 10)
#define ID_SERVER 80000
#define ID_A 80001
#define ID_B 80002
#define ID_REMOTE 80003
#define EP_SERVER 7
#define EP_A 8

#define IN WEFT_DIR_INGRESS
#define OUT WEFT_DIR_EGRESS
#define ALLOW WEFT_POLICY_ALLOW
#define DENY WEFT_POLICY_DENY
#define TCP IPPROTO_TCP

/* The server's ingress entry: peer identity, one port, action, rule. */
static __always_inline void allow(__u32 identity, __u16 port, __u8 proto, __u8 action, __u32 rule)
{
	unit_policy(EP_SERVER, IN, identity, proto, port, proto ? 16 : 0, action, rule, 0);
}

static __always_inline void fixture(__u8 ep_flags)
{
	unit_config(WEFT_EMIT_CONN, WEFT_CFG_ALLOW_HOST_INGRESS, NODE);
	unit_endpoint(SERVER, EP_SERVER, ID_SERVER, ep_flags);
	unit_identity(PEER_A, ID_A);
	unit_identity(PEER_B, ID_B);
	unit_identity(NODE, WEFT_ID_HOST);
	allow(ID_A, 8080, TCP, ALLOW, 11);
}

/* PEER_A as a local pod whose egress is under policy. */
static __always_inline void client_fixture(__u8 client_flags)
{
	unit_config(WEFT_EMIT_CONN, WEFT_CFG_ALLOW_HOST_INGRESS, NODE);
	unit_endpoint(PEER_A, EP_A, ID_A, client_flags);
	unit_identity(PEER_B, ID_B);
	unit_identity(REMOTE, ID_REMOTE);
}

/* The selected peer on the allowed port gets in; the verdict says how it matched. */
PKTGEN(policy_allow) { return unit_tcp(skb, PEER_A, SERVER, 40000, 8080, TCPF_SYN); }
SETUP(policy_allow)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	return handle_to_container(skb);
}
CHECK(policy_allow)
{
	struct weft_ct_entry *ct = unit_ct(PEER_A, SERVER, 40000, 8080);
	struct weft_event *verdict = unit_event(0), *trace = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(ct && (ct->flags & WEFT_CT_INGRESS_OK) && ct->src_identity == ID_A);
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->subtype == WEFT_POLICY_ALLOW);
	ASSERT(verdict->policy_match == WEFT_MATCH_L3_L4 && verdict->direction == WEFT_DIR_INGRESS);
	ASSERT(verdict->src_identity == ID_A && verdict->dst_identity == ID_SERVER && verdict->dst_ep == EP_SERVER);
	ASSERT(verdict->rule_id == 11 && verdict->proxy_port == 0);
	ASSERT(trace && trace->type == WEFT_EV_TRACE && trace->subtype == WEFT_OBS_TO_ENDPOINT);
	return 0;
}

/* Anyone else is dropped by default-deny, with the tuple and both identities. */
PKTGEN(policy_default_deny) { return unit_tcp(skb, PEER_B, SERVER, 40001, 8080, TCPF_SYN); }
SETUP(policy_default_deny)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	return handle_to_container(skb);
}
CHECK(policy_default_deny)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(!unit_ct(PEER_B, SERVER, 40001, 8080));
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->subtype == WEFT_POLICY_DENY);
	ASSERT(verdict->policy_match == WEFT_MATCH_NONE);
	ASSERT(drop && drop->type == WEFT_EV_DROP && drop->subtype == WEFT_DROP_POLICY_DENIED);
	ASSERT(drop->saddr == PEER_B && drop->daddr == SERVER);
	ASSERT(drop->sport == bpf_htons(40001) && drop->dport == bpf_htons(8080) && drop->proto == IPPROTO_TCP);
	ASSERT(drop->src_identity == ID_B && drop->dst_identity == ID_SERVER && drop->dst_ep == EP_SERVER);
	return 0;
}

/* The allowed peer on another port is denied too (L3+L4 rule). */
PKTGEN(policy_wrong_port) { return unit_tcp(skb, PEER_A, SERVER, 40000, 9090, TCPF_SYN); }
SETUP(policy_wrong_port)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	return handle_to_container(skb);
}
CHECK(policy_wrong_port)
{
	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	return 0;
}

/* An explicit deny of the peer beats its more specific allow (userspace
 * leaves such allows out; the deny of any peer beats it in the datapath). */
PKTGEN(policy_deny_wins) { return unit_tcp(skb, PEER_A, SERVER, 40000, 8080, TCPF_SYN); }
SETUP(policy_deny_wins)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	allow(0, 0, 0, DENY, 12);
	return handle_to_container(skb);
}
CHECK(policy_deny_wins)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_ALL && verdict->rule_id == 12);
	ASSERT(drop && drop->subtype == WEFT_DROP_POLICY_DENY);
	return 0;
}

/* A port-only rule admits any peer on that port. */
PKTGEN(policy_l4_only) { return unit_tcp(skb, PEER_B, SERVER, 40000, 53, TCPF_SYN); }
SETUP(policy_l4_only)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	allow(0, 53, TCP, ALLOW, 13);
	return handle_to_container(skb);
}
CHECK(policy_l4_only)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_L4_ONLY && verdict->subtype == WEFT_POLICY_ALLOW);
	return 0;
}

/* A port range is a block of the trie; every port of a protocol is its prefix. */
PKTGEN(policy_ranges) { return unit_packet(skb, PEER_B, SERVER, bpf_htons(5000), bpf_htons(5353), IPPROTO_UDP, 0); }
SETUP(policy_ranges)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	unit_policy(EP_SERVER, IN, ID_B, IPPROTO_UDP, 5352, 14, ALLOW, 14, 0); /* 5352-5355 */
	unit_policy(EP_SERVER, IN, 0, IPPROTO_UDP, 0, 0, ALLOW, 15, 0);          /* every UDP port */
	return handle_to_container(skb);
}
CHECK(policy_ranges)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	/* Both match; the peer's range is more specific than any peer's protocol. */
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_L3_L4 && verdict->rule_id == 14);
	return 0;
}

/* Any peer on every port of a protocol: Proto-Only. */
PKTGEN(policy_proto_only) { return unit_packet(skb, PEER_A, SERVER, bpf_htons(5000), bpf_htons(53), IPPROTO_UDP, 0); }
SETUP(policy_proto_only)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	unit_policy(EP_SERVER, IN, 0, IPPROTO_UDP, 0, 0, ALLOW, 15, 0);
	return handle_to_container(skb);
}
CHECK(policy_proto_only)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_PROTO_ONLY);
	return 0;
}

/* No policy selects the pod: everything is allowed and no verdict is reported. */
PKTGEN(policy_not_enforced) { return unit_tcp(skb, PEER_B, SERVER, 40000, 8080, TCPF_SYN); }
SETUP(policy_not_enforced)
{
	fixture(0);
	return handle_to_container(skb);
}
CHECK(policy_not_enforced)
{
	struct weft_event *ev = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(ev && ev->type == WEFT_EV_TRACE);
	ASSERT(unit_event_total() == 1);
	return 0;
}

/* The node itself may reach its pods (allow-host-ingress). */
PKTGEN(policy_host_allowed) { return unit_tcp(skb, NODE, SERVER, 40000, 8080, TCPF_SYN); }
SETUP(policy_host_allowed)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	return handle_to_container(skb);
}
CHECK(policy_host_allowed)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	return 0;
}

/* An admitted connection is not judged again: later packets pass as established. */
PKTGEN(policy_established) { return unit_tcp(skb, PEER_B, SERVER, 40000, 8080, TCPF_ACK); }
SETUP(policy_established)
{
	struct weft_ct_entry e = { .flags = WEFT_CT_INGRESS_OK, .seen_orig = TCPF_SYN | TCPF_ACK };

	fixture(WEFT_EP_POLICY_INGRESS);
	unit_ct_put(PEER_B, SERVER, 40000, 8080, &e);
	return handle_to_container(skb);
}
CHECK(policy_established)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 0); /* nothing new on this connection at connection level */
	return 0;
}

/* ---- Host policies: the node is endpoint WEFT_HOST_EP_ID. */

#define HOST WEFT_HOST_EP_ID

/* A pod reaches the node on the port its host policy allows the pod on; the
 * verdict is the node's ingress. */
PKTGEN(host_ingress_allowed) { return unit_tcp(skb, PEER_A, NODE, 42000, 9100, TCPF_SYN); }
SETUP(host_ingress_allowed)
{
	client_fixture(0);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_host_policy(WEFT_EP_POLICY_INGRESS);
	unit_policy(HOST, IN, ID_A, TCP, 9100, 16, ALLOW, 31, 0);
	return handle_from_container(skb);
}
CHECK(host_ingress_allowed)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_ct(PEER_A, NODE, 42000, 9100));
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->subtype == WEFT_POLICY_ALLOW);
	ASSERT(verdict->direction == WEFT_DIR_INGRESS && verdict->policy_match == WEFT_MATCH_L3_L4);
	ASSERT(verdict->src_identity == ID_A && verdict->dst_identity == WEFT_ID_HOST && verdict->rule_id == 31);
	return 0;
}

/* Another port of the node: default-deny, dropped before it is tracked. */
PKTGEN(host_ingress_denied) { return unit_tcp(skb, PEER_A, NODE, 42001, 9200, TCPF_SYN); }
SETUP(host_ingress_denied)
{
	client_fixture(0);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_host_policy(WEFT_EP_POLICY_INGRESS);
	unit_policy(HOST, IN, ID_A, TCP, 9100, 16, ALLOW, 31, 0);
	return handle_from_container(skb);
}
CHECK(host_ingress_denied)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(!unit_ct(PEER_A, NODE, 42001, 9200));
	ASSERT(verdict && verdict->subtype == WEFT_POLICY_DENY && verdict->direction == WEFT_DIR_INGRESS);
	ASSERT(verdict->dst_identity == WEFT_ID_HOST && verdict->policy_match == WEFT_MATCH_NONE);
	ASSERT(drop && drop->type == WEFT_EV_DROP && drop->subtype == WEFT_DROP_POLICY_DENIED);
	ASSERT(drop->direction == WEFT_DIR_INGRESS);
	return 0;
}

/* Without a host policy the node takes anything, and nothing is reported. */
PKTGEN(host_no_policy) { return unit_tcp(skb, PEER_A, NODE, 42002, 9200, TCPF_SYN); }
SETUP(host_no_policy)
{
	client_fixture(0);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_policy(HOST, IN, ID_A, TCP, 9100, 16, ALLOW, 31, 0);
	return handle_from_container(skb);
}
CHECK(host_no_policy)
{
	struct weft_event *ev = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(ev && ev->type == WEFT_EV_TRACE && unit_event_total() == 1);
	return 0;
}

/* The node opening a connection to a pod is its egress: denied here, before
 * the pod's own ingress (which lets the node in). */
PKTGEN(host_egress_denied) { return unit_tcp(skb, NODE, SERVER, 42003, 8080, TCPF_SYN); }
SETUP(host_egress_denied)
{
	fixture(0);
	unit_host_policy(WEFT_EP_POLICY_EGRESS);
	unit_policy(HOST, OUT, ID_A, TCP, 8080, 16, ALLOW, 32, 0);
	return handle_to_container(skb);
}
CHECK(host_egress_denied)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->subtype == WEFT_POLICY_DENY && verdict->direction == WEFT_DIR_EGRESS);
	ASSERT(verdict->src_identity == WEFT_ID_HOST && verdict->dst_identity == ID_SERVER);
	ASSERT(drop && drop->subtype == WEFT_DROP_POLICY_DENIED && drop->direction == WEFT_DIR_EGRESS);
	return 0;
}

/* The node's proxy's upstream connection (its sockets' mark) is not the
 * host's egress to judge; the pod's ingress still is (here the node may
 * reach pods: allow-host-ingress), and the connection is tracked. */
PKTGEN(host_egress_exempts_the_proxy) { return unit_tcp(skb, NODE, SERVER, 42004, 8080, TCPF_SYN); }
SETUP(host_egress_exempts_the_proxy)
{
	fixture(0);
	unit_host_policy(WEFT_EP_POLICY_EGRESS);
	skb->mark = WEFT_MARK_FROM_PROXY;
	return handle_to_container(skb);
}
CHECK(host_egress_exempts_the_proxy)
{
	struct weft_event *trace = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 1);
	ASSERT(trace && trace->type == WEFT_EV_TRACE);
	ASSERT(unit_ct(NODE, SERVER, 42004, 8080));
	return 0;
}

/* The proxy's mark exempts it from the host's egress only: a pod's own
 * ingress policy still judges its upstream connection. */
PKTGEN(proxy_upstream_meets_pod_ingress) { return unit_tcp(skb, NODE, SERVER, 42005, 8080, TCPF_SYN); }
SETUP(proxy_upstream_meets_pod_ingress)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	unit_config(WEFT_EMIT_CONN, 0, NODE); /* no allow-host-ingress */
	unit_host_policy(WEFT_EP_POLICY_EGRESS);
	skb->mark = WEFT_MARK_FROM_PROXY;
	return handle_to_container(skb);
}
CHECK(proxy_upstream_meets_pod_ingress)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->direction == WEFT_DIR_INGRESS);
	ASSERT(verdict->src_identity == WEFT_ID_HOST && verdict->dst_identity == ID_SERVER);
	ASSERT(verdict->dst_ep == EP_SERVER);
	ASSERT(drop && drop->subtype == WEFT_DROP_POLICY_DENIED && drop->direction == WEFT_DIR_INGRESS);
	return 0;
}

/* The node's reply to a connection a pod opened is not judged again. */
PKTGEN(host_reply_passes) { return unit_tcp(skb, NODE, PEER_A, 9100, 42000, TCPF_SYN | TCPF_ACK); }
SETUP(host_reply_passes)
{
	struct weft_ct_entry e = { .flags = WEFT_CT_EGRESS_OK, .seen_orig = TCPF_SYN };

	client_fixture(0);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_host_policy(WEFT_EP_POLICY_INGRESS | WEFT_EP_POLICY_EGRESS);
	unit_ct_put(PEER_A, NODE, 42000, 9100, &e);
	return handle_to_container(skb);
}
CHECK(host_reply_passes)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 1); /* the trace, no verdict */
	return 0;
}

/* ---- Egress. */

/* A pod an egress policy selects opens nothing that is not allowed. */
PKTGEN(egress_default_deny) { return unit_tcp(skb, PEER_A, PEER_B, 41000, 8080, TCPF_SYN); }
SETUP(egress_default_deny)
{
	client_fixture(WEFT_EP_POLICY_EGRESS);
	return handle_from_container(skb);
}
CHECK(egress_default_deny)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(!unit_ct(PEER_A, PEER_B, 41000, 8080));
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->subtype == WEFT_POLICY_DENY);
	ASSERT(verdict->direction == WEFT_DIR_EGRESS && verdict->policy_match == WEFT_MATCH_NONE);
	ASSERT(verdict->src_identity == ID_A && verdict->src_ep == EP_A && verdict->dst_identity == ID_B);
	ASSERT(drop && drop->type == WEFT_EV_DROP && drop->subtype == WEFT_DROP_POLICY_DENIED);
	ASSERT(drop->src_identity == ID_A && drop->dst_identity == ID_B && drop->src_ep == EP_A);
	ASSERT(drop->direction == WEFT_DIR_EGRESS);
	return 0;
}

/* Egress to a Service is judged on the backend it was translated to. */
PKTGEN(egress_service_backend) { return unit_tcp(skb, PEER_A, VIP, 41001, 80, TCPF_SYN); }
SETUP(egress_service_backend)
{
	client_fixture(WEFT_EP_POLICY_EGRESS);
	unit_service(VIP, 80, 0, 0, PEER_B, PEER_B, 8080, 1);
	unit_policy(EP_A, OUT, ID_B, TCP, 8080, 16, ALLOW, 21, 0);
	return handle_from_container(skb);
}
CHECK(egress_service_backend)
{
	struct weft_ct_entry *ct = unit_ct(PEER_A, PEER_B, 41001, 8080);
	struct weft_event *verdict = unit_event(0), *trace = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(ct && (ct->flags & WEFT_CT_EGRESS_OK) && (ct->flags & WEFT_CT_DNAT));
	ASSERT(verdict && verdict->subtype == WEFT_POLICY_ALLOW && verdict->direction == WEFT_DIR_EGRESS);
	ASSERT(verdict->daddr == PEER_B && verdict->dport == bpf_htons(8080));
	ASSERT(verdict->dst_identity == ID_B && verdict->policy_match == WEFT_MATCH_L3_L4 && verdict->rule_id == 21);
	ASSERT(trace && trace->type == WEFT_EV_TRACE && trace->orig_addr == VIP);
	return 0;
}

/* ...and the Service port alone does not let it through to a backend no rule names. */
PKTGEN(egress_service_denied) { return unit_tcp(skb, PEER_A, VIP, 41002, 80, TCPF_SYN); }
SETUP(egress_service_denied)
{
	client_fixture(WEFT_EP_POLICY_EGRESS);
	unit_service(VIP, 80, 0, 0, PEER_B, PEER_B, 8080, 1);
	unit_policy(EP_A, OUT, ID_REMOTE, TCP, 8080, 16, ALLOW, 21, 0);
	unit_policy(EP_A, OUT, 0, TCP, 80, 16, ALLOW, 22, 0); /* the frontend's port: not the destination */
	return handle_from_container(skb);
}
CHECK(egress_service_denied)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->subtype == WEFT_POLICY_DENY && verdict->daddr == PEER_B);
	return 0;
}

/* Replies to connections others opened pass: only what the pod opens is judged. */
PKTGEN(egress_reply_passes) { return unit_tcp(skb, PEER_A, PEER_B, 8080, 41003, TCPF_SYN | TCPF_ACK); }
SETUP(egress_reply_passes)
{
	struct weft_ct_entry e = { .flags = WEFT_CT_INGRESS_OK, .seen_orig = TCPF_SYN };

	client_fixture(WEFT_EP_POLICY_EGRESS);
	unit_ct_put(PEER_B, PEER_A, 41003, 8080, &e);
	return handle_from_container(skb);
}
CHECK(egress_reply_passes)
{
	struct weft_event *ev = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(ev && ev->type == WEFT_EV_TRACE && ev->reason == WEFT_REASON_REPLY);
	ASSERT(unit_event_total() == 1);
	return 0;
}

/* A connection the pod opened keeps going without being judged again. */
PKTGEN(egress_established) { return unit_tcp(skb, PEER_A, PEER_B, 41004, 8080, TCPF_ACK); }
SETUP(egress_established)
{
	struct weft_ct_entry e = { .flags = WEFT_CT_EGRESS_OK, .seen_orig = TCPF_SYN | TCPF_ACK };

	client_fixture(WEFT_EP_POLICY_EGRESS);
	unit_ct_put(PEER_A, PEER_B, 41004, 8080, &e);
	return handle_from_container(skb);
}
CHECK(egress_established)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 0);
	return 0;
}

/* An egress rule with L7 rules sends the connection to the proxy's port. */
PKTGEN(egress_to_proxy) { return unit_tcp(skb, PEER_A, PEER_B, 41005, 80, TCPF_SYN); }
SETUP(egress_to_proxy)
{
	client_fixture(WEFT_EP_POLICY_EGRESS);
	unit_policy(EP_A, OUT, ID_B, 0, 0, 0, ALLOW, 31, 0);       /* the peer on any port */
	unit_policy(EP_A, OUT, 0, TCP, 80, 16, ALLOW, 32, 10001); /* port 80 through the proxy */
	return handle_from_container(skb);
}
CHECK(egress_to_proxy)
{
	struct weft_ct_entry *ct = unit_ct(PEER_A, PEER_B, 41005, 80);
	struct weft_event *verdict = unit_event(0), *from = unit_event(1), *to = unit_event(2);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT((skb->mark & WEFT_MARK_MASK) == WEFT_MARK_TO_PROXY);
	ASSERT(ct && (ct->flags & WEFT_CT_PROXY) && ct->proxy_port == 10001);
	/* The port rule is more specific than the peer's any-port rule. */
	ASSERT(verdict && verdict->proxy_port == 10001 && verdict->policy_match == WEFT_MATCH_L4_ONLY);
	ASSERT(from && from->subtype == WEFT_OBS_FROM_ENDPOINT);
	ASSERT(to && to->subtype == WEFT_OBS_TO_PROXY && to->proxy_port == 10001);
	return 0;
}

/* A local client's connection to a pod whose ingress rule wants the proxy is
 * sent there where it leaves the client (the only place routing can still
 * take it to the proxy). */
PKTGEN(ingress_to_proxy_at_source) { return unit_tcp(skb, PEER_A, SERVER, 41006, 8080, TCPF_SYN); }
SETUP(ingress_to_proxy_at_source)
{
	client_fixture(0);
	unit_endpoint(SERVER, EP_SERVER, ID_SERVER, WEFT_EP_POLICY_INGRESS);
	unit_policy(EP_SERVER, IN, ID_A, TCP, 8080, 16, ALLOW, 41, 10002);
	return handle_from_container(skb);
}
CHECK(ingress_to_proxy_at_source)
{
	struct weft_ct_entry *ct = unit_ct(PEER_A, SERVER, 41006, 8080);
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT((skb->mark & WEFT_MARK_MASK) == WEFT_MARK_TO_PROXY);
	ASSERT(ct && (ct->flags & WEFT_CT_PROXY) && ct->proxy_port == 10002);
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->direction == WEFT_DIR_INGRESS);
	ASSERT(verdict->proxy_port == 10002 && verdict->dst_ep == EP_SERVER && verdict->src_identity == ID_A);
	return 0;
}

/* Established packets of a proxied connection keep going to the proxy. */
PKTGEN(proxy_established) { return unit_tcp(skb, PEER_A, SERVER, 41007, 8080, TCPF_ACK); }
SETUP(proxy_established)
{
	struct weft_ct_entry e = { .flags = WEFT_CT_EGRESS_OK | WEFT_CT_PROXY, .proxy_port = 10002 };

	client_fixture(0);
	unit_ct_put(PEER_A, SERVER, 41007, 8080, &e);
	return handle_from_container(skb);
}
CHECK(proxy_established)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT((skb->mark & WEFT_MARK_MASK) == WEFT_MARK_TO_PROXY);
	return 0;
}

/* A connection arriving at delivery that its rule wants through the proxy
 * came some way the datapath could not redirect: it is dropped, not let in
 * unexamined. */
PKTGEN(proxy_rule_at_delivery) { return unit_tcp(skb, PEER_A, SERVER, 41008, 8080, TCPF_SYN); }
SETUP(proxy_rule_at_delivery)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	unit_policy(EP_SERVER, IN, ID_A, TCP, 8080, 16, ALLOW, 41, 10002);
	return handle_to_container(skb);
}
CHECK(proxy_rule_at_delivery)
{
	struct weft_event *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(drop && drop->type == WEFT_EV_DROP && drop->subtype == WEFT_DROP_PROXY_LOOKUP_FAILED);
	return 0;
}
