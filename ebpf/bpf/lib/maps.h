/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the datapath. All are pinned by name under the agent's bpffs
 * directory, so each program object shares them and an agent restart reuses
 * them. Sizes here are defaults; the agent overrides them from its config
 * (agent/src/datapath/config.rs names each one).
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include "common.h"

#ifndef LIBBPF_PIN_BY_NAME
#define LIBBPF_PIN_BY_NAME 1
#endif

/* Unit-test objects keep their maps private: nothing is pinned. */
#ifdef WEFT_UNIT_TEST
#define WEFT_PINNING __uint(pinning, 0)
#else
#define WEFT_PINNING __uint(pinning, LIBBPF_PIN_BY_NAME)
#endif

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_config);
	WEFT_PINNING;
} weft_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weft_svc_key);
	__type(value, struct weft_svc_val);
	WEFT_PINNING;
} weft_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct weft_backend);
	WEFT_PINNING;
} weft_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct weft_endpoint);
	WEFT_PINNING;
} weft_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct weft_ipcache_key);
	__type(value, struct weft_ipcache_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	WEFT_PINNING;
} weft_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct weft_policy_key);
	__type(value, struct weft_policy_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	WEFT_PINNING;
} weft_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weft_ct_key);
	__type(value, struct weft_ct_entry);
	WEFT_PINNING;
} weft_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct weft_ct_key);
	__type(value, struct weft_lb_entry);
	WEFT_PINNING;
} weft_lb SEC(".maps");

/* Socket cookie -> frontend, so getpeername/recvmsg show the Service address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct weft_sock_rev);
	WEFT_PINNING;
} weft_sock_rev SEC(".maps");

/* Proxy port (host byte order) -> the proxy's listening socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32); /* a socket fd when written from userspace */
	WEFT_PINNING;
} weft_proxy_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
	WEFT_PINNING;
} weft_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	WEFT_PINNING;
} weft_event_stats SEC(".maps");

/* Where a record is assembled before it is copied into the ring buffer: keeps
 * the 72 bytes off the 512-byte BPF stack. Programs do not nest on a CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_event);
} weft_event_scratch SEC(".maps");

static __always_inline struct weft_config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weft_config, &zero);
}

#endif /* WEFT_MAPS_H */
