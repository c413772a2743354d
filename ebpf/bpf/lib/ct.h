/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking. weft_ct holds one entry per connection, keyed by the
 * tuple of its first packet after any translation; a packet matches it either
 * as-is (original direction) or reversed (reply). weft_lb maps a pre-translation
 * tuple to the translation chosen for the connection.
 */
#ifndef WEFT_CT_H
#define WEFT_CT_H

#include "maps.h"

enum ct_dir {
	CT_NEW = 0,
	CT_ESTABLISHED = 1, /* original direction */
	CT_REPLY = 2,
};

static __always_inline void ct_key_fwd(struct weft_ct_key *k, const struct pkt4 *p, __u8 scope)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->scope = scope;
	k->_pad = 0;
}

static __always_inline void ct_key_rev(struct weft_ct_key *k, const struct pkt4 *p, __u8 scope)
{
	k->saddr = p->daddr;
	k->daddr = p->saddr;
	k->sport = p->dport;
	k->dport = p->sport;
	k->proto = p->proto;
	k->scope = scope;
	k->_pad = 0;
}

/* Finds the connection of a packet. On return *key holds the entry's key
 * (the forward tuple for CT_NEW, ready for ct_create). */
static __always_inline int ct_lookup(const struct pkt4 *p, struct weft_ct_key *key,
				     struct weft_ct_entry **entry)
{
	ct_key_fwd(key, p, WEFT_CT_SCOPE_CONN);
	*entry = bpf_map_lookup_elem(&weft_ct, key);
	if (*entry)
		return CT_ESTABLISHED;
	ct_key_rev(key, p, WEFT_CT_SCOPE_CONN);
	*entry = bpf_map_lookup_elem(&weft_ct, key);
	if (*entry)
		return CT_REPLY;
	ct_key_fwd(key, p, WEFT_CT_SCOPE_CONN);
	return CT_NEW;
}

/* Records a packet on its connection. Returns the TCP flags seen in this
 * direction before the packet (for emit_wanted). Counters are atomic; the
 * last-seen stamp is refreshed at most once a second to spare the cache line. */
static __always_inline __u8 ct_account(struct weft_ct_entry *e, int dir, const struct pkt4 *p)
{
	__u64 now = now_ns();
	__u8 seen;

	if (now - e->last_seen_ns > NSEC_PER_SEC)
		e->last_seen_ns = now;
	if (dir == CT_REPLY) {
		__sync_fetch_and_add(&e->packets_reply, 1);
		__sync_fetch_and_add(&e->bytes_reply, p->len);
		seen = e->seen_reply;
		if ((p->tcp_flags & ~seen) != 0)
			e->seen_reply = seen | p->tcp_flags;
	} else {
		__sync_fetch_and_add(&e->packets_orig, 1);
		__sync_fetch_and_add(&e->bytes_orig, p->len);
		seen = e->seen_orig;
		if ((p->tcp_flags & ~seen) != 0)
			e->seen_orig = seen | p->tcp_flags;
	}
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST))
		e->flags |= WEFT_CT_CLOSING;
	return seen;
}

/* A SYN on an entry that already saw FIN/RST opens a new connection on a
 * reused tuple: start it over so policy and accounting apply afresh. */
static __always_inline int ct_is_reopen(const struct weft_ct_entry *e, const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP && (e->flags & WEFT_CT_CLOSING) &&
	       (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

static __always_inline void ct_entry_init(struct weft_ct_entry *e, const struct pkt4 *p, __u8 flags)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->created_ns = now_ns();
	e->last_seen_ns = e->created_ns;
	e->packets_orig = 1;
	e->bytes_orig = p->len;
	e->seen_orig = p->tcp_flags;
	e->flags = flags;
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST))
		e->flags |= WEFT_CT_CLOSING;
}

/* Inserts (or replaces) an entry and returns the map's copy. */
static __always_inline struct weft_ct_entry *ct_create(const struct weft_ct_key *key,
						       const struct weft_ct_entry *e)
{
	if (bpf_map_update_elem(&weft_ct, key, e, BPF_ANY) < 0)
		return 0;
	return bpf_map_lookup_elem(&weft_ct, key);
}

#endif /* WEFT_CT_H */
