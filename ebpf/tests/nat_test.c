/* SPDX-License-Identifier: Apache-2.0 */
/* North-south translation on the node device (lib/netdev.h): NodePort via a
 * remote backend (DNAT + SNAT), its reply, and masquerading. */
#include "unit.h"
#include "lib/netdev.h"

#define NODE IP4(192, 168, 50, 1)
#define EXT IP4(192, 168, 50, 100)
#define BACKEND IP4(10, 1, 2, 11)
#define POD IP4(10, 1, 1, 11)
#define WORLD IP4(172, 30, 0, 1)

PKTGEN(nodeport_snat) { return unit_tcp(skb, EXT, NODE, 50000, 30080, TCPF_SYN); }
SETUP(nodeport_snat)
{
	unit_config(WEFT_EMIT_CONN, 0, NODE);
	unit_service(NODE, 30080, WEFT_SVC_NODEPORT, 0, BACKEND, 0, 8080, 1);
	unit_set_rand(0);
	return handle_from_netdev(skb);
}
CHECK(nodeport_snat)
{
	struct unit_view v;
	struct weft_ct_entry *ct;
	struct weft_event *ev;
	__u16 port;

	/* Forwarded out by the datapath itself: redirect (a route exists in the
	 * runner's namespace) rather than handed to the stack. */
	ASSERT(unit_setup_verdict() == TC_ACT_REDIRECT);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.daddr == BACKEND && v.dport == bpf_htons(8080));
	ASSERT(v.ip.saddr == NODE);
	port = bpf_ntohs(v.sport);
	ASSERT(port >= 61000 && port <= 61009);
	ASSERT(v.ip.ttl == 63);
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	ct = unit_ct(NODE, BACKEND, port, 8080);
	ASSERT(ct && (ct->flags & WEFT_CT_SNAT) && (ct->flags & WEFT_CT_DNAT) && (ct->flags & WEFT_CT_NODEPORT));
	ASSERT(ct->snat_addr == EXT && ct->snat_port == bpf_htons(50000));
	ASSERT(ct->rev_addr == NODE && ct->rev_port == bpf_htons(30080));
	ev = unit_event(0);
	ASSERT(ev && ev->subtype == WEFT_OBS_FROM_NETWORK && ev->reason == WEFT_REASON_NEW);
	ASSERT((ev->flags & WEFT_EVF_XLATED_DST) && (ev->flags & WEFT_EVF_XLATED_SRC));
	ASSERT(ev->orig_addr == NODE && ev->nat_addr == NODE && ev->nat_port == v.sport);
	return 0;
}

PKTGEN(nodeport_reply) { return unit_tcp(skb, BACKEND, NODE, 8080, 61003, TCPF_SYN | TCPF_ACK); }
SETUP(nodeport_reply)
{
	struct weft_ct_entry e = {
		.flags = WEFT_CT_DNAT | WEFT_CT_SNAT | WEFT_CT_NODEPORT,
		.rev_addr = NODE, .rev_port = bpf_htons(30080),
		.snat_addr = EXT, .snat_port = bpf_htons(50000),
	};

	unit_config(WEFT_EMIT_CONN, 0, NODE);
	unit_ct_put(NODE, BACKEND, 61003, 8080, &e);
	return handle_from_netdev(skb);
}
CHECK(nodeport_reply)
{
	struct unit_view v;

	ASSERT(unit_setup_verdict() == TC_ACT_REDIRECT);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.saddr == NODE && v.sport == bpf_htons(30080));
	ASSERT(v.ip.daddr == EXT && v.dport == bpf_htons(50000));
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	return 0;
}

/* Pod traffic leaving the native-routing CIDR takes the node's address. */
PKTGEN(masquerade) { return unit_tcp(skb, POD, WORLD, 45000, 443, TCPF_SYN); }
SETUP(masquerade)
{
	unit_config(WEFT_EMIT_CONN, WEFT_CFG_MASQUERADE, NODE);
	unit_endpoint(POD, 3, 90000, 0);
	unit_set_rand(5);
	skb->mark = WEFT_MARK_SEEN; /* as set by from-container */
	return handle_to_netdev(skb);
}
CHECK(masquerade)
{
	struct unit_view v;
	struct weft_ct_entry *ct;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.saddr == NODE && v.ip.daddr == WORLD);
	ASSERT(bpf_ntohs(v.sport) >= 61000 && bpf_ntohs(v.sport) <= 61009);
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	ct = unit_ct(NODE, WORLD, bpf_ntohs(v.sport), 443);
	ASSERT(ct && (ct->flags & WEFT_CT_SNAT) && ct->snat_addr == POD && ct->snat_port == bpf_htons(45000));
	return 0;
}

/* Inside the native-routing CIDR nothing is masqueraded. */
PKTGEN(no_masquerade_inside) { return unit_tcp(skb, POD, IP4(10, 1, 2, 11), 45000, 443, TCPF_SYN); }
SETUP(no_masquerade_inside)
{
	unit_config(WEFT_EMIT_CONN, WEFT_CFG_MASQUERADE, NODE);
	unit_endpoint(POD, 3, 90000, 0);
	skb->mark = WEFT_MARK_SEEN;
	return handle_to_netdev(skb);
}
CHECK(no_masquerade_inside)
{
	struct unit_view v;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.saddr == POD && v.sport == bpf_htons(45000));
	return 0;
}

/* Host egress on the node's device: a node process's new connection is
 * judged (here denied: egress default-deny, no entry), the node's proxy's
 * upstream (its sockets' mark) is not, and is tracked so its replies pass. */
PKTGEN(host_egress_on_the_device) { return unit_tcp(skb, NODE, WORLD, 46000, 443, TCPF_SYN); }
SETUP(host_egress_on_the_device)
{
	unit_config(WEFT_EMIT_CONN, 0, NODE);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_host_policy(WEFT_EP_POLICY_EGRESS);
	return handle_to_netdev(skb);
}
CHECK(host_egress_on_the_device)
{
	struct weft_event *verdict = unit_event(0), *drop = unit_event(1);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(verdict && verdict->type == WEFT_EV_POLICY && verdict->direction == WEFT_DIR_EGRESS);
	ASSERT(verdict->src_identity == WEFT_ID_HOST && verdict->src_ep == WEFT_HOST_EP_ID);
	ASSERT(drop && drop->subtype == WEFT_DROP_POLICY_DENIED);
	ASSERT(!unit_ct(NODE, WORLD, 46000, 443));
	return 0;
}

PKTGEN(proxy_upstream_on_the_device) { return unit_tcp(skb, NODE, WORLD, 46001, 443, TCPF_SYN); }
SETUP(proxy_upstream_on_the_device)
{
	unit_config(WEFT_EMIT_CONN, 0, NODE);
	unit_identity(NODE, WEFT_ID_HOST);
	unit_host_policy(WEFT_EP_POLICY_EGRESS);
	skb->mark = WEFT_MARK_FROM_PROXY;
	return handle_to_netdev(skb);
}
CHECK(proxy_upstream_on_the_device)
{
	struct weft_ct_entry *ct = unit_ct(NODE, WORLD, 46001, 443);

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 1); /* the trace, no verdict */
	ASSERT(ct && (ct->flags & WEFT_CT_FROM_HOST));
	return 0;
}
