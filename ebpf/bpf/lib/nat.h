/* SPDX-License-Identifier: Apache-2.0 */
/* Address and port rewriting with checksum fix-up, and SNAT port allocation. */
#ifndef WEFT_NAT_H
#define WEFT_NAT_H

#include "ct.h"

#define IP_CSUM_OFF 10
#define IP_TTL_OFF 8
#define IP_SADDR_OFF 12
#define IP_DADDR_OFF 16
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6

static __always_inline int l4_csum_off(const struct pkt4 *p)
{
	if (p->proto == IPPROTO_TCP)
		return p->l4_off + TCP_CSUM_OFF;
	if (p->proto == IPPROTO_UDP)
		return p->l4_off + UDP_CSUM_OFF;
	return -1;
}

static __always_inline int has_ports(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
}

/* Rewrites the source (is_src) or destination address and port of the packet
 * and of *p. Returns 0 or a negative drop reason. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct pkt4 *p, int is_src,
				       __u32 new_addr, __u16 new_port)
{
	__u32 old_addr = is_src ? p->saddr : p->daddr;
	__u16 old_port = is_src ? p->sport : p->dport;
	int csum_off = l4_csum_off(p);
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_addr != new_addr) {
		if (csum_off >= 0 &&
		    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		if (bpf_l3_csum_replace(skb, p->l3_off + IP_CSUM_OFF, old_addr, new_addr,
					sizeof(new_addr)) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		if (bpf_skb_store_bytes(skb, p->l3_off + (is_src ? IP_SADDR_OFF : IP_DADDR_OFF),
					&new_addr, sizeof(new_addr), 0) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		if (is_src)
			p->saddr = new_addr;
		else
			p->daddr = new_addr;
	}
	if (has_ports(p) && old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					mangled | sizeof(new_port)) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		if (bpf_skb_store_bytes(skb, p->l4_off + (is_src ? 0 : 2), &new_port,
					sizeof(new_port), 0) < 0)
			return -WEFT_DROP_WRITE_ERROR;
		if (is_src)
			p->sport = new_port;
		else
			p->dport = new_port;
	}
	return 0;
}

#define SNAT_TRIES 16

/* Picks a source port in the configured range for which the translated tuple
 * (nat_addr:port -> p's destination) is free, and inserts its connection entry
 * (whose template holds the reverse translation). Returns the port in network
 * byte order, or 0 when the range is exhausted for this destination. */
static __always_inline __u16 snat_alloc(const struct weft_config *cfg, const struct pkt4 *p,
					__u32 nat_addr, const struct weft_ct_entry *tmpl)
{
	__u32 min = cfg && cfg->nat_port_min ? cfg->nat_port_min : 61000;
	__u32 max = cfg && cfg->nat_port_max ? cfg->nat_port_max : 65535;
	__u32 range = max >= min ? max - min + 1 : 1;
	__u32 start = bpf_get_prandom_u32();
	struct weft_ct_key key = {
		.saddr = nat_addr,
		.daddr = p->daddr,
		.dport = p->dport,
		.proto = p->proto,
		.scope = WEFT_CT_SCOPE_CONN,
	};

#pragma unroll
	for (int i = 0; i < SNAT_TRIES; i++) {
		__u16 port = bpf_htons((__u16)(min + (start + i * 7919) % range));

		key.sport = port;
		if (bpf_map_update_elem(&weft_ct, &key, tmpl, BPF_NOEXIST) == 0)
			return port;
	}
	return 0;
}

/* Decrements the TTL of a packet this node forwards itself (bypassing the
 * stack). Returns 0, or a negative drop reason when the TTL runs out. */
static __always_inline int ttl_dec(struct __sk_buff *skb, const struct pkt4 *p)
{
	__u8 ttl;
	__u16 old_word, new_word;

	if (bpf_skb_load_bytes(skb, p->l3_off + IP_TTL_OFF, &ttl, 1) < 0)
		return -WEFT_DROP_INVALID_PACKET;
	if (ttl <= 1)
		return -WEFT_DROP_INVALID_PACKET;
	/* TTL is the high byte of the 16-bit word it shares with the protocol. */
	old_word = bpf_htons((__u16)ttl << 8);
	new_word = bpf_htons((__u16)(ttl - 1) << 8);
	if (bpf_l3_csum_replace(skb, p->l3_off + IP_CSUM_OFF, old_word, new_word, 2) < 0)
		return -WEFT_DROP_WRITE_ERROR;
	ttl--;
	if (bpf_skb_store_bytes(skb, p->l3_off + IP_TTL_OFF, &ttl, 1, 0) < 0)
		return -WEFT_DROP_WRITE_ERROR;
	return 0;
}

#endif /* WEFT_NAT_H */
