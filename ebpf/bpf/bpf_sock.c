/* SPDX-License-Identifier: Apache-2.0 */
/* Entry programs for node processes (cgroup hooks) and the proxy hand-off
 * (sk_lookup). The logic lives in lib/sock.h. */
#include "lib/sock.h"

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, 1);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, 0);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("sk_lookup")
int proxy_sk_lookup(struct bpf_sk_lookup *ctx)
{
	return proxy_assign(ctx);
}

char _license[] SEC("license") = "GPL";
