#!/usr/bin/env python3
"""Envoy's own cost of N L7 listeners in three shapes, with Envoy's file-based LDS (state of the
world: every update re-reads the whole file, so "noop_s" is that cost alone):

  bound:   N listeners on 127.0.0.1:<port> (weft before issue 12: a socket per worker each);
  chains:  one transparent listener with N filter chains matched by destination IP and port;
  virtual: N bind_to_port:false listeners at the Service address, reached from one transparent
           listener with use_original_dst (weft's shape since issue 12).

Prints per shape: time to load N (until all active), Envoy's RSS and open files, the time for an
update that changes one listener among N, and for one that changes nothing; and checks that the
middle listener answers on its Service address. Root; runs in a network namespace of its own:

  sudo python3 benches/envoy-listener-shapes.py virtual,chains,bound 1000 [WORKERS]

Envoy: $WEFT_ENVOY, else `envoy` on PATH (tests/env.sh sets both)."""
import json, os, subprocess, sys, time, urllib.request, resource, shutil, socket

ENVOY = os.environ.get("WEFT_ENVOY") or shutil.which("envoy") or "envoy"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
LST = "type.googleapis.com/envoy.config.listener.v3.Listener"

def vip(i): return f"10.97.{i // 250}.{i % 250 + 1}"

def hcm(i, body):
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {"@type": HCM,
        "stat_prefix": f"c{i}", "route_config": {"name": f"r{i}", "virtual_hosts": [{"name": "v", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}

def sa(a, p): return {"socket_address": {"address": a, "port_value": p}}

def listeners(shape, n, changed=None, ver=""):
    body = lambda i: f"c{i}" + ("-v2" if i == changed else "")
    if shape == "bound":
        return [{"@type": LST, "name": f"l{i}", "address": sa("127.0.0.1", 20000 + i), "transparent": True,
                 "enable_reuse_port": False, "filter_chains": [{"filters": [hcm(i, body(i))]}]} for i in range(n)]
    if shape == "chains":
        return [{"@type": LST, "name": "dispatch", "address": sa("0.0.0.0", 80), "transparent": True,
                 "filter_chains": [{"name": f"l{i}", "filter_chain_match": {"prefix_ranges": [{"address_prefix": vip(i), "prefix_len": 32}], "destination_port": 80},
                                    "filters": [hcm(i, body(i))]} for i in range(n)],
                 "default_filter_chain": {"filters": [hcm(-1, "nomatch")]}}]
    if shape == "virtual":
        return [{"@type": LST, "name": "dispatch", "address": sa("0.0.0.0", 80), "transparent": True, "use_original_dst": True,
                 "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
                 "filter_chains": [{"filters": [hcm(-1, "dispatcher")]}]}] + \
               [{"@type": LST, "name": f"l{i}", "address": sa(vip(i), 80), "bind_to_port": False,
                 "filter_chains": [{"filters": [hcm(i, body(i))]}]} for i in range(n)]

def write(d, shape, n, changed=None, ver="1"):
    tmp = os.path.join(d, "tmp.json")
    with open(tmp, "w") as f:
        json.dump({"version_info": ver, "resources": listeners(shape, n, changed)}, f)
    os.rename(tmp, os.path.join(d, "lds", "lds.json"))

def stats():
    with urllib.request.urlopen("http://127.0.0.1:9901/stats?filter=^listener_manager\\.", timeout=30) as r:
        out = {}
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            try: out[k] = int(v)
            except ValueError: pass
        return out

def wait(pred, limit=600):
    t0 = time.time()
    while True:
        try:
            s = stats()
            if pred(s): return time.time() - t0, s
        except Exception: pass
        if time.time() - t0 > limit: raise SystemExit("timeout")
        time.sleep(0.02)

def rss_fds(pid):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    return rss // 1024, len(os.listdir(f"/proc/{pid}/fd"))

def get(ip, port=80):
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(4096)
        if not b: break
        data += b
    return data.split(b"\r\n\r\n", 1)[-1].decode()

def run(shape, n, workers):
    d = f"/tmp/weft-envoy-shapes/run-{shape}"
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d + "/lds")
    boot = {"node": {"id": "x", "cluster": "x"}, "admin": {"address": sa("127.0.0.1", 9901)},
            "dynamic_resources": {"lds_config": {"path_config_source": {"path": d + "/lds/lds.json", "watched_directory": {"path": d + "/lds"}}, "resource_api_version": "V3"}}}
    with open(d + "/lds/lds.json", "w") as f: json.dump({"version_info": "0", "resources": []}, f)
    with open(d + "/boot.json", "w") as f: json.dump(boot, f)
    p = subprocess.Popen([ENVOY, "-c", d + "/boot.json", "--concurrency", str(workers), "-l", "warning", "--base-id", str(os.getpid() % 1000)],
                         stdout=open(d + "/log", "w"), stderr=subprocess.STDOUT)
    try:
        wait(lambda s: "listener_manager.lds.update_success" in s, 60)
        base_rss, base_fds = rss_fds(p.pid)
        want = n if shape == "bound" else (1 if shape == "chains" else n + 1)
        ok0 = stats()["listener_manager.lds.update_success"]
        write(d, shape, n, ver="1")
        t_load, s = wait(lambda s: s["listener_manager.lds.update_success"] > ok0 and s.get("listener_manager.total_listeners_active", 0) == want
                         or s.get("listener_manager.lds.update_rejected", 0) > 0)
        if s.get("listener_manager.lds.update_rejected", 0):
            print(open(d + "/log").read()[-2000:]); raise SystemExit(f"{shape}: rejected")
        rss, fds = rss_fds(p.pid)
        # functional: the middle config answers on its Service address
        mid = n // 2
        body = get(vip(mid)) if shape != "bound" else get("127.0.0.1", 20000 + mid)
        # one listener (or chain) changed among n
        times = []
        for r in range(3):
            ok = stats()["listener_manager.lds.update_success"]
            write(d, shape, n, changed=mid if r % 2 == 0 else None, ver=str(2 + r))
            t, _ = wait(lambda s: s["listener_manager.lds.update_success"] > ok)
            times.append(t)
        # nothing changed (the parse-and-diff cost of the file alone)
        ok = stats()["listener_manager.lds.update_success"]
        write(d, shape, n, changed=None, ver="9")
        t_noop, s = wait(lambda s: s["listener_manager.lds.update_success"] > ok)
        body2 = get(vip(mid)) if shape != "bound" else get("127.0.0.1", 20000 + mid)
        print(json.dumps({"shape": shape, "n": n, "workers": workers, "load_s": round(t_load, 2), "rss_mib": rss, "fds": fds - base_fds,
                          "update_one_s": [round(t, 3) for t in times], "noop_s": round(t_noop, 3), "answer": body, "answer_after": body2,
                          "in_place": s.get("listener_manager.listener_in_place_updated", 0), "modified": s.get("listener_manager.listener_modified", 0)}), flush=True)
    finally:
        p.terminate(); p.wait()

if __name__ == "__main__":
    if os.environ.get("WEFT_SHAPES_NETNS") is None:
        ns = f"weft-shapes-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            env = dict(os.environ, WEFT_SHAPES_NETNS=ns)
            sys.exit(subprocess.run(["ip", "netns", "exec", ns, sys.executable] + sys.argv, env=env).returncode)
        finally:
            subprocess.run(["ip", "netns", "del", ns])
            shutil.rmtree("/tmp/weft-envoy-shapes", ignore_errors=True)
    h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "route", "replace", "local", "10.97.0.0/16", "dev", "lo"], check=True)
    n = int(sys.argv[2]); workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    for shape in sys.argv[1].split(","):
        run(shape, n, workers)
