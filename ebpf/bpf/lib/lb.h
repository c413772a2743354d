/* SPDX-License-Identifier: Apache-2.0 */
/* Service lookup and per-connection backend selection. */
#ifndef WEFT_LB_H
#define WEFT_LB_H

#include "maps.h"

static __always_inline struct weft_svc_val *svc_lookup(__u32 addr, __u16 port, __u8 proto)
{
	struct weft_svc_key key = {
		.addr = addr,
		.port = port,
		.slot = 0,
		.proto = proto,
	};

	return bpf_map_lookup_elem(&weft_services, &key);
}

/* Picks a backend uniformly at random for a new connection; the choice is then
 * kept in weft_lb so the connection stays on it. */
static __always_inline struct weft_backend *svc_pick_backend(__u32 addr, __u16 port, __u8 proto,
							     const struct weft_svc_val *svc,
							     __u32 *backend_id)
{
	struct weft_svc_key key = {
		.addr = addr,
		.port = port,
		.proto = proto,
	};
	struct weft_svc_val *slot;

	if (!svc->count)
		return 0;
	key.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&weft_services, &key);
	if (!slot)
		return 0;
	*backend_id = slot->backend_id;
	return bpf_map_lookup_elem(&weft_backends, backend_id);
}

static __always_inline struct weft_backend *backend_get(__u32 id)
{
	return bpf_map_lookup_elem(&weft_backends, &id);
}

#endif /* WEFT_LB_H */
