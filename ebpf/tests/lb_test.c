/* SPDX-License-Identifier: Apache-2.0 */
/* Service lookup, backend selection and DNAT on the pod side (lib/lxc.h). */
#include "unit.h"
#include "lib/lxc.h"

#define CLIENT IP4(10, 1, 1, 11)
#define B1 IP4(10, 1, 1, 12)
#define B2 IP4(10, 1, 2, 11)
#define VIP IP4(10, 96, 0, 10)
#define ID_CLIENT 70000

/* A new connection to the ClusterIP is DNATed to the backend of the drawn slot. */
PKTGEN(dnat_new) { return unit_tcp(skb, CLIENT, VIP, 40000, 80, TCPF_SYN); }
SETUP(dnat_new)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, 0);
	unit_service(VIP, 80, 0, 0, B1, B2, 8080, 2);
	unit_set_rand(1); /* slot 1 % 2 + 1 = 2: B2 */
	return handle_from_container(skb);
}
CHECK(dnat_new)
{
	struct unit_view v;
	struct weft_ct_entry *ct;
	struct weft_lb_entry *lb;
	struct weft_event *ev;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.saddr == CLIENT && v.sport == bpf_htons(40000));
	ASSERT(v.ip.daddr == B2 && v.dport == bpf_htons(8080));
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	ct = unit_ct(CLIENT, B2, 40000, 8080);
	ASSERT(ct && (ct->flags & WEFT_CT_DNAT));
	ASSERT(ct->rev_addr == VIP && ct->rev_port == bpf_htons(80));
	ASSERT(ct->src_identity == ID_CLIENT);
	lb = unit_lb(CLIENT, VIP, 40000, 80);
	ASSERT(lb && lb->backend_id == 2 && lb->backend_addr == B2);
	ev = unit_event(0);
	ASSERT(ev && ev->type == WEFT_EV_TRACE && ev->subtype == WEFT_OBS_FROM_ENDPOINT);
	ASSERT(ev->reason == WEFT_REASON_NEW && (ev->flags & WEFT_EVF_XLATED_DST));
	ASSERT(ev->orig_addr == VIP && ev->orig_port == bpf_htons(80));
	ASSERT(ev->daddr == B2 && ev->src_identity == ID_CLIENT && ev->src_ep == 1);
	ASSERT(unit_event_total() == 1);
	return 0;
}

/* A connection keeps the backend it got, whatever the next draw would be. */
PKTGEN(dnat_sticky) { return unit_tcp(skb, CLIENT, VIP, 40000, 80, TCPF_ACK); }
SETUP(dnat_sticky)
{
	struct weft_ct_key k = unit_ct_key(CLIENT, VIP, 40000, 80, WEFT_CT_SCOPE_SVC);
	struct weft_lb_entry lb = { .backend_id = 1, .backend_addr = B1, .backend_port = bpf_htons(8080) };

	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, 0);
	unit_service(VIP, 80, 0, 0, B1, B2, 8080, 2);
	bpf_map_update_elem(&weft_lb, &k, &lb, BPF_ANY);
	unit_set_rand(1); /* would draw B2 */
	return handle_from_container(skb);
}
CHECK(dnat_sticky)
{
	struct unit_view v;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.daddr == B1 && v.dport == bpf_htons(8080));
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	return 0;
}

/* Draws map onto slots 1..count: every backend is reachable. */
PKTGEN(backend_spread) { return unit_tcp(skb, CLIENT, VIP, 40000, 80, TCPF_SYN); }
SETUP(backend_spread)
{
	struct weft_svc_val *svc;
	__u32 seen1 = 0, seen2 = 0, other = 0, id;
	int i;

	unit_service(VIP, 80, 0, 0, B1, B2, 8080, 2);
	svc = svc_lookup(VIP, bpf_htons(80), IPPROTO_TCP);
	if (!svc)
		return 1;
	for (i = 0; i < 4; i++) {
		struct weft_backend *be;

		unit_set_rand(i);
		be = svc_pick_backend(VIP, bpf_htons(80), IPPROTO_TCP, svc, &id);
		if (be && be->addr == B1 && id == 1)
			seen1++;
		else if (be && be->addr == B2 && id == 2)
			seen2++;
		else
			other++;
	}
	return seen1 == 2 && seen2 == 2 && other == 0 ? 0 : 2;
}
CHECK(backend_spread)
{
	ASSERT(unit_setup_verdict() == 0);
	ASSERT(!svc_lookup(VIP, bpf_htons(81), IPPROTO_TCP)); /* other port: no service */
	ASSERT(!svc_lookup(VIP, bpf_htons(80), IPPROTO_UDP)); /* other protocol: no service */
	return 0;
}

/* The reply is reverse-translated on delivery to the client. */
PKTGEN(revnat_reply) { return unit_tcp(skb, B2, CLIENT, 8080, 40000, TCPF_SYN | TCPF_ACK); }
SETUP(revnat_reply)
{
	struct weft_ct_entry e = {
		.flags = WEFT_CT_DNAT, .rev_addr = VIP, .rev_port = bpf_htons(80), .seen_orig = TCPF_SYN,
	};

	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, WEFT_EP_POLICY_INGRESS); /* replies skip policy */
	unit_ct_put(CLIENT, B2, 40000, 8080, &e);
	return handle_to_container(skb);
}
CHECK(revnat_reply)
{
	struct unit_view v;
	struct weft_event *ev;
	struct weft_ct_entry *ct;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.saddr == VIP && v.sport == bpf_htons(80));
	ASSERT(v.ip.daddr == CLIENT && v.dport == bpf_htons(40000));
	ASSERT(v.ip_csum_ok && v.l4_csum_ok);
	ev = unit_event(0);
	ASSERT(ev && ev->subtype == WEFT_OBS_TO_ENDPOINT && ev->reason == WEFT_REASON_REPLY);
	ASSERT((ev->flags & WEFT_EVF_REVNAT) && ev->orig_addr == B2 && ev->orig_port == bpf_htons(8080));
	ct = unit_ct(CLIENT, B2, 40000, 8080);
	ASSERT(ct && ct->packets_reply == 1 && ct->seen_reply == (TCPF_SYN | TCPF_ACK));
	return 0;
}

/* A Service without backends drops with NO_SERVICE, and says so. */
PKTGEN(no_backends) { return unit_tcp(skb, CLIENT, VIP, 40000, 80, TCPF_SYN); }
SETUP(no_backends)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, 0);
	unit_service(VIP, 80, 0, 0, B1, B2, 8080, 0);
	return handle_from_container(skb);
}
CHECK(no_backends)
{
	struct weft_event *ev = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(ev && ev->type == WEFT_EV_DROP && ev->subtype == WEFT_DROP_NO_SERVICE);
	ASSERT(ev->saddr == CLIENT && ev->daddr == VIP && ev->dport == bpf_htons(80));
	ASSERT(ev->src_identity == ID_CLIENT && ev->drop_line != 0);
	return 0;
}

/* An L7 Service is not translated: the packet is marked for the proxy. */
PKTGEN(l7_redirect) { return unit_tcp(skb, CLIENT, VIP, 40000, 80, TCPF_SYN); }
SETUP(l7_redirect)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, 0);
	unit_service(VIP, 80, WEFT_SVC_L7, 15001, B1, B2, 8080, 2);
	return handle_from_container(skb);
}
CHECK(l7_redirect)
{
	struct unit_view v;
	struct weft_ct_entry *ct;
	struct weft_event *ev;

	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT((skb->mark & WEFT_MARK_MASK) == WEFT_MARK_TO_PROXY);
	ASSERT(unit_read(skb, &v) == 0);
	ASSERT(v.ip.daddr == VIP && v.dport == bpf_htons(80));
	ct = unit_ct(CLIENT, VIP, 40000, 80);
	ASSERT(ct && (ct->flags & WEFT_CT_PROXY) && ct->proxy_port == 15001);
	ASSERT(unit_event_total() == 2);
	ev = unit_event(0);
	ASSERT(ev && ev->subtype == WEFT_OBS_FROM_ENDPOINT);
	ev = unit_event(1);
	ASSERT(ev && ev->subtype == WEFT_OBS_TO_PROXY && ev->proxy_port == 15001);
	return 0;
}

/* A source address that is no local endpoint is spoofed: dropped. */
PKTGEN(spoofed_source) { return unit_tcp(skb, IP4(10, 9, 9, 9), VIP, 40000, 80, TCPF_SYN); }
SETUP(spoofed_source)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	unit_endpoint(CLIENT, 1, ID_CLIENT, 0);
	return handle_from_container(skb);
}
CHECK(spoofed_source)
{
	struct weft_event *ev = unit_event(0);

	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(ev && ev->subtype == WEFT_DROP_INVALID_SOURCE_IP);
	return 0;
}
