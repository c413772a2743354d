/* SPDX-License-Identifier: Apache-2.0 */
/* How much is reported at each emission level (lib/events.h, lib/trace.h). */
#include "unit.h"
#include "lib/lxc.h"

#define A IP4(10, 1, 1, 11)
#define B IP4(10, 1, 1, 12)

static __always_inline void established(__u8 seen)
{
	struct weft_ct_entry e = { .seen_orig = seen };

	unit_endpoint(A, 1, 70001, 0);
	unit_endpoint(B, 2, 70002, 0);
	unit_ct_put(A, B, 40000, 8080, &e);
}

/* Connection level: a data packet with flags already seen is not reported. */
PKTGEN(emit_conn_quiet) { return unit_tcp(skb, A, B, 40000, 8080, TCPF_ACK | TCPF_PSH); }
SETUP(emit_conn_quiet)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	established(TCPF_SYN | TCPF_ACK | TCPF_PSH);
	return handle_from_container(skb);
}
CHECK(emit_conn_quiet)
{
	ASSERT(unit_setup_verdict() == TC_ACT_OK);
	ASSERT(unit_event_total() == 0);
	return 0;
}

/* Connection level: a new TCP flag in a direction is reported (here FIN). */
PKTGEN(emit_conn_flag_change) { return unit_tcp(skb, A, B, 40000, 8080, TCPF_ACK | TCPF_FIN); }
SETUP(emit_conn_flag_change)
{
	unit_config(WEFT_EMIT_CONN, 0, 0);
	established(TCPF_SYN | TCPF_ACK);
	return handle_from_container(skb);
}
CHECK(emit_conn_flag_change)
{
	struct weft_event *ev = unit_event(0);
	struct weft_ct_entry *ct = unit_ct(A, B, 40000, 8080);

	ASSERT(ev && ev->reason == WEFT_REASON_ESTABLISHED && ev->tcp_flags == (TCPF_ACK | TCPF_FIN));
	ASSERT(ev->src_ep == 1 && ev->dst_ep == 2 && ev->src_identity == 70001 && ev->dst_identity == 70002);
	ASSERT(ev->pkt_len == 54);
	ASSERT(ct && (ct->flags & WEFT_CT_CLOSING));
	return 0;
}

/* Packet level: everything is reported. */
PKTGEN(emit_packet) { return unit_tcp(skb, A, B, 40000, 8080, TCPF_ACK | TCPF_PSH); }
SETUP(emit_packet)
{
	unit_config(WEFT_EMIT_ALL, 0, 0);
	established(TCPF_SYN | TCPF_ACK | TCPF_PSH);
	return handle_from_container(skb);
}
CHECK(emit_packet)
{
	ASSERT(unit_event_total() == 1);
	return 0;
}

/* Off: not even drops are reported. */
PKTGEN(emit_off) { return unit_tcp(skb, IP4(10, 9, 9, 9), B, 40000, 8080, TCPF_SYN); }
SETUP(emit_off)
{
	unit_config(WEFT_EMIT_OFF, 0, 0);
	unit_endpoint(B, 2, 70002, 0);
	return handle_from_container(skb);
}
CHECK(emit_off)
{
	ASSERT(unit_setup_verdict() == TC_ACT_SHOT);
	ASSERT(unit_event_total() == 0);
	return 0;
}
