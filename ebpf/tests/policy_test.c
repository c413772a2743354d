/* SPDX-License-Identifier: Apache-2.0 */
/* Ingress policy at delivery into a pod (lib/policy.h via lib/lxc.h). */
#include "unit.h"
#include "lib/lxc.h"

#define SERVER IP4(10, 1, 2, 11)
#define PEER_A IP4(10, 1, 1, 11)
#define PEER_B IP4(10, 1, 1, 12)
#define NODE IP4(192, 168, 50, 2)
#define ID_SERVER 80000
#define ID_A 80001
#define ID_B 80002

static __always_inline void allow(__u32 identity, __u16 port, __u8 proto, __u8 action, __u32 rule)
{
	struct weft_policy_key k = {
		.identity = identity, .ep_id = 7, .dport = bpf_htons(port), .proto = proto,
		.direction = WEFT_DIR_INGRESS,
	};
	struct weft_policy_val v = { .action = action, .rule_id = rule };

	bpf_map_update_elem(&weft_policy, &k, &v, BPF_ANY);
}

static __always_inline void fixture(__u8 ep_flags)
{
	unit_config(WEFT_EMIT_CONN, WEFT_CFG_ALLOW_HOST_INGRESS, NODE);
	unit_endpoint(SERVER, 7, ID_SERVER, ep_flags);
	unit_identity(PEER_A, ID_A);
	unit_identity(PEER_B, ID_B);
	unit_identity(NODE, WEFT_ID_HOST);
	allow(ID_A, 8080, IPPROTO_TCP, WEFT_POLICY_ALLOW, 11);
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
	ASSERT(verdict->src_identity == ID_A && verdict->dst_identity == ID_SERVER && verdict->dst_ep == 7);
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
	ASSERT(drop->src_identity == ID_B && drop->dst_identity == ID_SERVER && drop->dst_ep == 7);
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

/* An explicit deny beats an allow, and is reported as POLICY_DENY. */
PKTGEN(policy_deny_wins) { return unit_tcp(skb, PEER_A, SERVER, 40000, 8080, TCPF_SYN); }
SETUP(policy_deny_wins)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	allow(ID_A, 0, 0, WEFT_POLICY_DENY, 12);
	return handle_to_container(skb);
}
CHECK(policy_deny_wins)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_L3_ONLY);
	ASSERT(drop && drop->subtype == WEFT_DROP_POLICY_DENY);
	return 0;
}

/* A port-only rule admits any peer on that port. */
PKTGEN(policy_l4_only) { return unit_tcp(skb, PEER_B, SERVER, 40000, 53, TCPF_SYN); }
SETUP(policy_l4_only)
{
	fixture(WEFT_EP_POLICY_INGRESS);
	allow(0, 53, IPPROTO_TCP, WEFT_POLICY_ALLOW, 13);
	return handle_to_container(skb);
}
CHECK(policy_l4_only)
{
	struct weft_event *verdict = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(verdict && verdict->policy_match == WEFT_MATCH_L4_ONLY && verdict->subtype == WEFT_POLICY_ALLOW);
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
