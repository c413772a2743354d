/* SPDX-License-Identifier: Apache-2.0 */
/* Includes, constants and small helpers every program uses. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "weft/abi.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif

/* The first bytes of an ICMP echo header (linux/icmp.h drags in libc headers). */
struct icmp_echo_hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 seq;
};
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* TCP flag bits as they sit in byte 13 of the TCP header. */
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10
#define TCPF_URG 0x20
#define TCPF_ECE 0x40
#define TCPF_CWR 0x80

#define NSEC_PER_SEC 1000000000ULL

/* A parsed IPv4 packet: offsets and the 5-tuple, read with bpf_skb_load_bytes so
 * every program sees the same view whatever the device's headroom. */
struct pkt4 {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* ICMP echo request: the identifier */
	__u16 dport; /* ICMP echo reply: the identifier */
	__u8 proto;
	__u8 tcp_flags;
	__u8 ihl_bytes;
	__u8 is_icmp_echo_reply;
	__u32 l3_off;
	__u32 l4_off;
	__u32 len;
};

/* Outcome of parsing: 0 = IPv4 parsed, >0 = not IPv4 (let it through), <0 = drop reason. */
#define PARSE_OK 0
#define PARSE_NOT_IPV4 1

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct iphdr ip;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;
	p->l3_off = ETH_HLEN;
	if (bpf_skb_load_bytes(skb, p->l3_off, &ip, sizeof(ip)) < 0)
		return -WEFT_DROP_INVALID_PACKET;
	if (ip.version != 4 || ip.ihl < 5)
		return -WEFT_DROP_INVALID_PACKET;
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -WEFT_DROP_FRAG_NOSUPPORT;

	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->ihl_bytes = ip.ihl * 4;
	p->l4_off = p->l3_off + p->ihl_bytes;
	p->len = skb->len;
	p->tcp_flags = 0;
	p->sport = 0;
	p->dport = 0;
	p->is_icmp_echo_reply = 0;

	switch (ip.protocol) {
	case IPPROTO_TCP: {
		__u8 hdr[14];

		if (bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
			return -WEFT_DROP_CT_INVALID_HDR;
		__builtin_memcpy(&p->sport, &hdr[0], 2);
		__builtin_memcpy(&p->dport, &hdr[2], 2);
		p->tcp_flags = hdr[13];
		break;
	}
	case IPPROTO_UDP: {
		__u16 ports[2];

		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
			return -WEFT_DROP_CT_INVALID_HDR;
		p->sport = ports[0];
		p->dport = ports[1];
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp_echo_hdr icmp;

		if (bpf_skb_load_bytes(skb, p->l4_off, &icmp, sizeof(icmp)) < 0)
			return -WEFT_DROP_CT_INVALID_HDR;
		/* Echo request and reply are tracked by identifier; errors are
		 * passed through untracked (no ICMP error NAT in this version).
		 * The identifier sits in the source "port" of a request and the
		 * destination "port" of a reply, so reversing a tuple works as for TCP. */
		if (icmp.type == ICMP_ECHO) {
			p->sport = icmp.id;
		} else if (icmp.type == ICMP_ECHOREPLY) {
			p->dport = icmp.id;
			p->is_icmp_echo_reply = 1;
		}
		break;
	}
	default:
		break;
	}
	return PARSE_OK;
}

static __always_inline __u64 now_ns(void)
{
	return bpf_ktime_get_ns();
}

#endif /* WEFT_COMMON_H */
