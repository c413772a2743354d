/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The C unit-test harness. A test NAME is three tc programs, run by
 * ebpf/tests/c_unit.rs through BPF_PROG_TEST_RUN:
 *
 *   NAME__pktgen  builds the packet (from a 14-byte Ethernet header the runner gives)
 *   NAME__setup   fills the maps and runs the datapath logic on the packet;
 *                 its return value is the verdict under test
 *   NAME__check   gets the packet setup left (and its skb context) and returns
 *                 0, or the line of the first failed ASSERT
 *
 * Each test gets a freshly loaded object: no map state leaks between tests.
 * Include this first, then the lib headers under test.
 */
#ifndef WEFT_UNIT_H
#define WEFT_UNIT_H

#include "lib/common.h"

/* Backend selection and SNAT ports draw bpf_get_prandom_u32(): tests choose
 * its value through unit_rand, so the picks are known. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} unit_rand SEC(".maps");

static __always_inline __u32 unit_prandom(void)
{
	__u32 zero = 0, *v = bpf_map_lookup_elem(&unit_rand, &zero);

	return v ? (*v)++ : 0;
}
#define bpf_get_prandom_u32 unit_prandom

static __always_inline void unit_set_rand(__u32 v)
{
	__u32 zero = 0;

	bpf_map_update_elem(&unit_rand, &zero, &v, BPF_ANY);
}

/* The setup program's verdict, written here by the runner before the check runs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} unit_verdict SEC(".maps");

static __always_inline int unit_setup_verdict(void)
{
	__u32 zero = 0, *v = bpf_map_lookup_elem(&unit_verdict, &zero);

	return v ? (int)*v : -1;
}

#include "lib/events.h"

#define PKTGEN(name) SEC("classifier") int name##__pktgen(struct __sk_buff *skb)
#define SETUP(name) SEC("classifier") int name##__setup(struct __sk_buff *skb)
#define CHECK(name) SEC("classifier") int name##__check(struct __sk_buff *skb)

#define ASSERT(cond)                      \
	do {                              \
		if (!(cond))              \
			return __LINE__;  \
	} while (0)

#define IP4(a, b, c, d) bpf_htonl(((__u32)(a) << 24) | ((b) << 16) | ((c) << 8) | (d))

static __always_inline __u16 csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

struct unit_pseudo {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
};

/* Builds an IPv4 TCP (20-byte header) or UDP packet with valid checksums. */
static __always_inline int unit_packet(struct __sk_buff *skb, __u32 saddr, __u32 daddr, __u16 sport,
				       __u16 dport, __u8 proto, __u8 tcp_flags)
{
	__u32 l4len = proto == IPPROTO_TCP ? 20 : 8;
	struct iphdr ip = {};
	struct unit_pseudo ph = {};
	__u8 l4[20] = {};
	__s64 sum;

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + l4len, 0) < 0)
		return TC_ACT_SHOT;
	ip.version = 4;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.protocol = proto;
	ip.tot_len = bpf_htons(sizeof(ip) + l4len);
	ip.saddr = saddr;
	ip.daddr = daddr;
	ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));

	__builtin_memcpy(&l4[0], &sport, 2);
	__builtin_memcpy(&l4[2], &dport, 2);
	if (proto == IPPROTO_TCP) {
		l4[12] = 5 << 4; /* data offset */
		l4[13] = tcp_flags;
		l4[15] = 0xff;   /* window */
	} else {
		__u16 ulen = bpf_htons(8);

		__builtin_memcpy(&l4[4], &ulen, 2);
	}
	ph.saddr = saddr;
	ph.daddr = daddr;
	ph.proto = proto;
	ph.len = bpf_htons(l4len);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)l4, l4len, sum);
	{
		__u16 c = csum_fold(sum);

		__builtin_memcpy(&l4[proto == IPPROTO_TCP ? 16 : 6], &c, 2);
	}
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), l4, l4len, 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

#define unit_tcp(skb, s, d, sp, dp, flags) \
	unit_packet(skb, s, d, bpf_htons(sp), bpf_htons(dp), IPPROTO_TCP, flags)

/* The packet as a check sees it, with its checksums verified. */
struct unit_view {
	struct iphdr ip;
	__u16 sport;
	__u16 dport;
	__u8 tcp_flags;
	int ip_csum_ok;
	int l4_csum_ok;
};

static __always_inline int unit_read(struct __sk_buff *skb, struct unit_view *v)
{
	struct unit_pseudo ph = {};
	__u8 l4[20] = {};
	__u32 l4len;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &v->ip, sizeof(v->ip)) < 0)
		return -1;
	l4len = v->ip.protocol == IPPROTO_TCP ? 20 : 8;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(v->ip), l4, l4len) < 0)
		return -1;
	__builtin_memcpy(&v->sport, &l4[0], 2);
	__builtin_memcpy(&v->dport, &l4[2], 2);
	v->tcp_flags = l4[13];
	v->ip_csum_ok = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&v->ip, sizeof(v->ip), 0)) == 0;
	ph.saddr = v->ip.saddr;
	ph.daddr = v->ip.daddr;
	ph.proto = v->ip.protocol;
	ph.len = bpf_htons(l4len);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)l4, l4len, sum);
	v->l4_csum_ok = csum_fold(sum) == 0;
	return 0;
}

/* The n-th record (from 0) the setup program wrote, or NULL. */
static __always_inline struct weft_event *unit_event(__u32 n)
{
	__u32 zero = 0, *count = bpf_map_lookup_elem(&unit_event_count, &zero);

	if (!count || n >= *count)
		return 0;
	n &= 15;
	return bpf_map_lookup_elem(&unit_events, &n);
}

static __always_inline __u32 unit_event_total(void)
{
	__u32 zero = 0, *count = bpf_map_lookup_elem(&unit_event_count, &zero);

	return count ? *count : 0;
}

/* ---- Map fixtures. */

static __always_inline void unit_config(__u32 emit_level, __u32 flags, __u32 node_ip)
{
	__u32 zero = 0;
	struct weft_config c = {
		.emit_level = emit_level,
		.flags = flags,
		.node_ip = node_ip,
		.native_cidr = IP4(10, 0, 0, 0),
		.native_cidr_len = 8,
		.nat_port_min = 61000,
		.nat_port_max = 61009,
	};

	bpf_map_update_elem(&weft_config, &zero, &c, BPF_ANY);
}

/* Puts the node under a host policy in the directions `host_policy` says
 * (WEFT_EP_POLICY_*), keeping the rest of the config. */
static __always_inline void unit_host_policy(__u8 host_policy)
{
	__u32 zero = 0;
	struct weft_config *c = bpf_map_lookup_elem(&weft_config, &zero);

	if (c)
		c->host_policy = host_policy;
}

static __always_inline void unit_endpoint(__u32 addr, __u16 ep_id, __u32 identity, __u8 flags)
{
	struct weft_endpoint ep = { .ifindex = 1, .identity = identity, .ep_id = ep_id, .flags = flags };
	struct weft_ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct weft_ipcache_val v = { .identity = identity, .flags = WEFT_IPC_LOCAL };

	bpf_map_update_elem(&weft_endpoints, &addr, &ep, BPF_ANY);
	bpf_map_update_elem(&weft_ipcache, &k, &v, BPF_ANY);
}

static __always_inline void unit_identity(__u32 addr, __u32 identity)
{
	struct weft_ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct weft_ipcache_val v = { .identity = identity };

	bpf_map_update_elem(&weft_ipcache, &k, &v, BPF_ANY);
}

/* A policy entry of endpoint ep_id: a peer (0: any), a protocol (0: any, and
 * then every port), and a block of ports starting at `port` with `port_bits`
 * of it fixed (16: that port alone; 0: every port of the protocol). */
static __always_inline void unit_policy(__u16 ep_id, __u8 dir, __u32 identity, __u8 proto, __u16 port,
					__u8 port_bits, __u8 action, __u32 rule, __u16 proxy_port)
{
	struct weft_policy_key k = {
		.ep_id = ep_id, .direction = dir, .identity = identity, .proto = proto, .dport = bpf_htons(port),
	};
	struct weft_policy_val v = { .action = action, .rule_id = rule, .proxy_port = proxy_port };

	k.prefixlen = proto ? WEFT_POLICY_PREFIX_PROTO + port_bits : WEFT_POLICY_PREFIX_FIXED;
	v.prefixlen = k.prefixlen;
	bpf_map_update_elem(&weft_policy, &k, &v, BPF_ANY);
}

/* A frontend with up to two backends (ids 1 and 2 at `port`); count 0 = none. */
static __always_inline void unit_service(__u32 addr, __u16 port, __u8 flags, __u16 proxy_port,
					 __u32 b1, __u32 b2, __u16 backend_port, __u16 count)
{
	struct weft_svc_key k = { .addr = addr, .port = bpf_htons(port), .proto = IPPROTO_TCP };
	struct weft_svc_val v = { .backend_id = 100, .count = count, .proxy_port = proxy_port, .flags = flags };
	struct weft_backend be1 = { .addr = b1, .port = bpf_htons(backend_port), .proto = IPPROTO_TCP };
	struct weft_backend be2 = { .addr = b2, .port = bpf_htons(backend_port), .proto = IPPROTO_TCP };
	__u32 id1 = 1, id2 = 2;

	bpf_map_update_elem(&weft_backends, &id1, &be1, BPF_ANY);
	bpf_map_update_elem(&weft_backends, &id2, &be2, BPF_ANY);
	if (count >= 1) {
		struct weft_svc_val s = { .backend_id = 1 };

		k.slot = 1;
		bpf_map_update_elem(&weft_services, &k, &s, BPF_ANY);
	}
	if (count >= 2) {
		struct weft_svc_val s = { .backend_id = 2 };

		k.slot = 2;
		bpf_map_update_elem(&weft_services, &k, &s, BPF_ANY);
	}
	k.slot = 0;
	bpf_map_update_elem(&weft_services, &k, &v, BPF_ANY);
}

static __always_inline struct weft_ct_key unit_ct_key(__u32 s, __u32 d, __u16 sp, __u16 dp, __u8 scope)
{
	struct weft_ct_key k = {
		.saddr = s, .daddr = d, .sport = bpf_htons(sp), .dport = bpf_htons(dp),
		.proto = IPPROTO_TCP, .scope = scope,
	};

	return k;
}

/* The connection entry of a TCP tuple (ports in host order), or NULL. */
static __always_inline struct weft_ct_entry *unit_ct(__u32 s, __u32 d, __u16 sp, __u16 dp)
{
	struct weft_ct_key k = unit_ct_key(s, d, sp, dp, WEFT_CT_SCOPE_CONN);

	return bpf_map_lookup_elem(&weft_ct, &k);
}

/* Writes the connection entry of a TCP tuple. */
static __always_inline void unit_ct_put(__u32 s, __u32 d, __u16 sp, __u16 dp, const struct weft_ct_entry *e)
{
	struct weft_ct_key k = unit_ct_key(s, d, sp, dp, WEFT_CT_SCOPE_CONN);

	bpf_map_update_elem(&weft_ct, &k, e, BPF_ANY);
}

/* The service translation of a pre-DNAT TCP tuple, or NULL. */
static __always_inline struct weft_lb_entry *unit_lb(__u32 s, __u32 d, __u16 sp, __u16 dp)
{
	struct weft_ct_key k = unit_ct_key(s, d, sp, dp, WEFT_CT_SCOPE_SVC);

	return bpf_map_lookup_elem(&weft_lb, &k);
}

char _license[] SEC("license") = "GPL";

#endif /* WEFT_UNIT_H */
