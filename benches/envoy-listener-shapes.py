#!/usr/bin/env python3
"""Envoy's own cost of N L7 listeners, by listener shape and by each choice weft makes.

Two ways of feeding Envoy:

Files (Envoy's file-based LDS, state of the world: every update re-reads the whole file, so
"noop_s" is that cost alone), routes inline, no clusters; the three shapes issue 12 compared:

  bound:   N listeners on 127.0.0.1:<port> (weft before issue 12: a socket per worker each);
  chains:  one transparent listener with N filter chains matched by destination IP and port;
  virtual: N bind_to_port:false listeners at the Service address, reached from one transparent
           listener with use_original_dst (weft's shape since issue 12).

ADS (a gRPC aggregated discovery server in this script, state of the world, as weft serves
Envoy): `ads` is what weft sends for N EnvoyConfigs like the control-plane bench's (a virtual
listener with exact connection balance, its routes over RDS, an EDS cluster with one endpoint,
weft's JSON access log, qualified names, a stat prefix per config), and each `+option` changes
one choice:

  +nobalance     no connection_balance_config (weft sets exact balance);
  +addr2         a second address per listener (additional_addresses);
  +inline        routes inline in the connection manager instead of over RDS;
  +static        STATIC clusters with their endpoint inline instead of EDS;
  +noclusters    no clusters at all, routes answer directly;
  +nolog         no access log;
  +short         short names (l<i>, r<i>, c<i>) instead of <namespace>/<config>/<name>;
  +oneprefix     one stat prefix shared by every connection manager;
  +nostats       Envoy keeps no stats at all (bootstrap stats_matcher reject_all);
  +deferred      a cluster's traffic stats made on first use (bootstrap deferred_stat_options);
  +lean          Envoy keeps only the stats weft's default keeps (`envoy.stats: traffic`: the
                 server's and managers' own, and a few request and connection counters per
                 connection manager, listener and cluster; LEAN_STATS);
  +clustersonly  the clusters (and endpoints) alone, no config listeners: their cost apart;
  +batch<B>      listeners delivered B at a time (each update all listeners so far, as state
                 of the world requires), the next once Envoy ACKed the one before;
  +group<K>      configs grouped K to a listener: one bind_to_port:false listener per group at
                 the group's Service addresses, each config its own filter chain matched by its
                 Service address (N/K listeners instead of N);
  +files         LDS and CDS from files (needs +inline and +static or +noclusters).

For each variant and N: time from the first response to the moment Envoy ACKed every type
and all listeners are active, the CPU time of Envoy's main thread (which applies every update;
less disturbed by a busy machine than the wall time) and of the whole process, when each type
was ACKed (Envoy's admin interface does not answer while an update is applied), Envoy's RSS,
the time to apply one changed config among N, and the wall and main-thread CPU time of an LDS
update that re-sends the N listeners unchanged (what state of the world costs Envoy for every
listener change); checks that the middle config answers on its Service address. Root;
runs in a network namespace of its own, Envoy bounded in time:

  sudo python3 benches/envoy-listener-shapes.py virtual,chains,bound 1000 [WORKERS]
  sudo python3 benches/envoy-listener-shapes.py ads,ads+nobalance,ads+group100 1000,2000,4000 [WORKERS]

Several N fit time(N) = a + b*N + c*N^2 per variant (exactly, with three N), printed last.

Envoy: $WEFT_ENVOY, else `envoy` on PATH (tests/env.sh sets both). The ADS server needs Python's
grpcio and protobuf (the repository's .venv) and Envoy's descriptors from a weft-agent build
($WEFT_ENVOY_DESCRIPTORS, else found under /var/cache/weft/target*)."""
import glob, json, os, queue, resource, shutil, socket, subprocess, sys, threading, time, urllib.request

ENVOY = os.environ.get("WEFT_ENVOY") or shutil.which("envoy") or "envoy"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
LST = "type.googleapis.com/envoy.config.listener.v3.Listener"
RC = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
ADS_PORT, BACKEND_PORT, ADMIN = 18000, 8081, "http://127.0.0.1:9901"
WORK = "/tmp/weft-envoy-shapes"
LIMIT_S = float(os.environ.get("WEFT_SHAPES_LIMIT_S", "900"))  # per run: Envoy is stopped after

def vip(i): return f"10.97.{i // 250}.{i % 250 + 1}"
def vip2(i): return f"10.98.{i // 250}.{i % 250 + 1}"
def sa(a, p): return {"socket_address": {"address": a, "port_value": p}}

# ---------------------------------------------------------------------------------------------
# Files: the three shapes of issue 12's first comparison

def hcm(i, body):
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {"@type": HCM,
        "stat_prefix": f"c{i}", "route_config": {"name": f"r{i}", "virtual_hosts": [{"name": "v", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
        "http_filters": [ROUTER]}}

def dispatch_listener(filters):
    return {"@type": LST, "name": "dispatch", "address": sa("0.0.0.0", 80), "transparent": True, "use_original_dst": True,
            "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
            "filter_chains": [{"filters": filters}]}

def listeners(shape, n, changed=None):
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
        return [dispatch_listener([hcm(-1, "dispatcher")])] + \
               [{"@type": LST, "name": f"l{i}", "address": sa(vip(i), 80), "bind_to_port": False,
                 "filter_chains": [{"filters": [hcm(i, body(i))]}]} for i in range(n)]
    raise SystemExit(f"unknown shape {shape}")

def write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)

def stats():
    with urllib.request.urlopen(ADMIN + "/stats?filter=^(listener_manager|cluster_manager)\\.", timeout=60) as r:
        out = {}
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            try: out[k] = int(v)
            except ValueError: pass
        return out

def wait(pred, limit=LIMIT_S):
    t0 = time.time()
    while True:
        try:
            s = stats()
            if pred(s): return time.time() - t0, s
        except Exception: pass
        if time.time() - t0 > limit: raise SystemExit("timeout")
        time.sleep(0.02)

def wait_ready(limit):
    t0 = time.time()
    while time.time() - t0 < limit:
        try:
            with urllib.request.urlopen(ADMIN + "/ready", timeout=5) as r:
                if r.status == 200: return
        except Exception: pass
        time.sleep(0.05)
    raise SystemExit("Envoy did not become ready")

def active_listeners():
    with urllib.request.urlopen(ADMIN + "/listeners?format=json", timeout=60) as r:
        return len(json.loads(r.read()).get("listener_statuses", []))

def cpu_s(pid):
    """CPU seconds (user + system) of Envoy's main thread and of the whole process: the main
    thread applies every update, so its time is what a busy machine disturbs least."""
    def ticks(path):
        f = open(path).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return ticks(f"/proc/{pid}/task/{pid}/stat"), ticks(f"/proc/{pid}/stat")

def perf_start(pid, d):
    """`perf record` of Envoy while it loads, when WEFT_SHAPES_PERF is set (a report is printed)."""
    if not os.environ.get("WEFT_SHAPES_PERF"): return None
    return subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", d + "/perf.data"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def perf_stop(rec, d):
    if rec is None: return
    rec.send_signal(2); rec.wait()
    rep = subprocess.run(["perf", "report", "-i", d + "/perf.data", "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none"],
                         capture_output=True, text=True).stdout
    keep = os.environ.get("WEFT_SHAPES_PERF")
    if keep and keep != "1": shutil.copy(d + "/perf.data", keep)
    print("\n".join(l for l in rep.splitlines() if l.strip() and not l.startswith("#"))[:6000], flush=True)

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
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode() + " " + body.decode()[:40]

def start_envoy(d, boot, workers):
    write_json(d + "/boot.json", boot)
    return subprocess.Popen([ENVOY, "-c", d + "/boot.json", "--concurrency", str(workers), "-l", "warning",
                             "--base-id", str(os.getpid() % 1000), "--drain-time-s", "1"],
                            stdout=open(d + "/log", "w"), stderr=subprocess.STDOUT)

def stop_envoy(p):
    p.terminate()
    try: p.wait(timeout=20)
    except subprocess.TimeoutExpired: p.kill(); p.wait()

def run_files(shape, n, workers):
    d = f"{WORK}/run-{shape}"
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d + "/lds")
    lds = d + "/lds/lds.json"
    boot = {"node": {"id": "x", "cluster": "x"}, "admin": {"address": sa("127.0.0.1", 9901)},
            "dynamic_resources": {"lds_config": {"path_config_source": {"path": lds, "watched_directory": {"path": d + "/lds"}}, "resource_api_version": "V3"}}}
    write_json(lds, {"version_info": "0", "resources": []})
    p = start_envoy(d, boot, workers)
    try:
        wait(lambda s: "listener_manager.lds.update_success" in s, 60)
        _, base_fds = rss_fds(p.pid)
        want = n if shape == "bound" else (1 if shape == "chains" else n + 1)
        ok0 = stats()["listener_manager.lds.update_success"]
        write_json(lds, {"version_info": "1", "resources": listeners(shape, n)})
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
            write_json(lds, {"version_info": str(2 + r), "resources": listeners(shape, n, changed=mid if r % 2 == 0 else None)})
            t, _ = wait(lambda s: s["listener_manager.lds.update_success"] > ok)
            times.append(t)
        # nothing changed (the parse-and-diff cost of the file alone)
        ok = stats()["listener_manager.lds.update_success"]
        write_json(lds, {"version_info": "9", "resources": listeners(shape, n)})
        t_noop, s = wait(lambda s: s["listener_manager.lds.update_success"] > ok)
        body2 = get(vip(mid)) if shape != "bound" else get("127.0.0.1", 20000 + mid)
        out = {"variant": shape, "n": n, "workers": workers, "load_s": round(t_load, 2), "rss_mib": rss, "fds": fds - base_fds,
               "update_one_s": [round(t, 3) for t in times], "noop_s": round(t_noop, 3), "answer": body, "answer_after": body2,
               "in_place": s.get("listener_manager.listener_in_place_updated", 0), "modified": s.get("listener_manager.listener_modified", 0)}
        print(json.dumps(out), flush=True)
        return out
    finally:
        stop_envoy(p)

# ---------------------------------------------------------------------------------------------
# ADS: weft's resources, one choice varied at a time

# weft's access-log format (observe/src/pipeline/accesslog.rs FORMAT), the same size and shape
LOG_KEYS = ["start", "duration", "method", "scheme", "authority", "path", "protocol", "code", "request_id",
            "traceparent", "tracestate", "user_agent", "route", "cluster", "upstream", "upstream_local", "flags",
            "client", "server", "policy", "governing", "envoy"]
LOG_OPS = ["%START_TIME(%s.%9f)%", "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:ns)%", "%REQ(:METHOD)%", "%REQ(:SCHEME)%",
           "%REQ(:AUTHORITY)%", "%REQ(:PATH)%", "%PROTOCOL%", "%RESPONSE_CODE%", "%REQ(X-REQUEST-ID)%", "%REQ(TRACEPARENT)%",
           "%REQ(TRACESTATE)%", "%REQ(USER-AGENT)%", "%ROUTE_NAME%", "%UPSTREAM_CLUSTER%", "%UPSTREAM_HOST%",
           "%UPSTREAM_LOCAL_ADDRESS%", "%RESPONSE_FLAGS%", "%DOWNSTREAM_REMOTE_ADDRESS%", "%DOWNSTREAM_LOCAL_ADDRESS%",
           "%DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_effective_policy_id)%",
           "%DYNAMIC_METADATA(envoy.filters.http.rbac:shadow_effective_policy_id)%", "%ENVIRONMENT(HOME)%"]

# What the agent's bootstrap keeps with `envoy.stats: traffic` (agent/src/envoy/mod.rs,
# TRAFFIC_STAT_PREFIXES and _SUFFIXES), written out again here (this script's xDS cluster is `xds`): Envoy's own (prefixes) and a few counters of each
# connection manager, listener and cluster (suffixes).
LEAN_PREFIXES = ["server.", "cluster_manager.", "listener_manager.", "runtime.", "control_plane.", "access_logs.",
                 "overload.", "workers.", "main_thread.", "filesystem.", "http.admin.", "listener.admin.", "cluster.xds."]
LEAN_SUFFIXES = [".downstream_rq_total", ".downstream_rq_completed", ".downstream_rq_active", ".downstream_rq_1xx",
                 ".downstream_rq_2xx", ".downstream_rq_3xx", ".downstream_rq_4xx", ".downstream_rq_5xx",
                 ".downstream_rq_time", ".downstream_cx_total", ".downstream_cx_active",
                 ".upstream_rq_total", ".upstream_rq_completed", ".upstream_rq_active", ".upstream_rq_retry",
                 ".upstream_rq_timeout", ".upstream_rq_1xx", ".upstream_rq_2xx", ".upstream_rq_3xx",
                 ".upstream_rq_4xx", ".upstream_rq_5xx", ".upstream_rq_time", ".upstream_cx_total",
                 ".upstream_cx_active", ".upstream_cx_connect_fail", ".membership_healthy", ".membership_total"]
LEAN_STATS = [{"prefix": x} for x in LEAN_PREFIXES] + [{"suffix": x} for x in LEAN_SUFFIXES]

def parse_variant(v):
    parts = v.split("+")
    if parts[0] != "ads":
        return None
    o = {"balance": True, "addr2": False, "routes": "rds", "clusters": "eds", "log": True, "short": False,
         "oneprefix": False, "nostats": False, "lean": False, "deferred": False, "clustersonly": False, "batch": 0, "group": 1, "files": False}
    for p in parts[1:]:
        if p == "nobalance": o["balance"] = False
        elif p == "addr2": o["addr2"] = True
        elif p == "inline": o["routes"] = "inline"
        elif p == "static": o["clusters"] = "static"
        elif p == "noclusters": o["clusters"] = "none"
        elif p == "nolog": o["log"] = False
        elif p == "short": o["short"] = True
        elif p == "oneprefix": o["oneprefix"] = True
        elif p == "nostats": o["nostats"] = True
        elif p == "deferred": o["deferred"] = True
        elif p == "lean": o["lean"] = True
        elif p == "clustersonly": o["clustersonly"] = True
        elif p.startswith("batch"): o["batch"] = int(p[5:])
        elif p.startswith("group"): o["group"] = int(p[5:])
        elif p == "files": o["files"] = True
        else: raise SystemExit(f"unknown option +{p}")
    if o["files"] and (o["routes"] != "inline" or o["clusters"] == "eds" or o["batch"]):
        raise SystemExit("+files needs +inline and +static or +noclusters, and no +batch")
    return o

def names(o, i):
    """The listener's, route configuration's and cluster's names, as weft qualifies them."""
    if o["short"]:
        return f"l{i}", f"r{i}", f"c{i}"
    return f"default/c{i}/c{i}-listener", f"default/c{i}/c{i}-route", f"default/s{i}"

def ads_source(): return {"ads": {}, "resource_api_version": "V3"}

def route_config(o, i, changed):
    _, r, c = names(o, i)
    action = {"direct_response": {"status": 200, "body": {"inline_string": f"c{i}"}}} if o["clusters"] == "none" \
        else {"route": {"cluster": c}}
    routes = [{"match": {"prefix": "/"}, **action}]
    if i == changed:  # a second route: the edit the "one changed" update carries
        routes.insert(0, {"match": {"prefix": "/v2"}, "direct_response": {"status": 200}})
    return {"name": r, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}

def ads_hcm(o, i, changed):
    l, r, _ = names(o, i)
    h = {"@type": HCM, "stat_prefix": "weft" if o["oneprefix"] else f"c{i}", "http_filters": [ROUTER]}
    if o["routes"] == "rds":
        h["rds"] = {"config_source": ads_source(), "route_config_name": r}
    else:
        h["route_config"] = route_config(o, i, changed)
    if o["log"]:
        h["access_log"] = [{"name": "weft-flows", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": f"{WORK}/access.log", "log_format": {"json_format": dict(zip(LOG_KEYS, LOG_OPS))}}}]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": h}

def ads_listeners(o, n, changed=None):
    """What weft sends for configs 0..n (after the dispatcher)."""
    def addrs(i): return [vip(i)] + ([vip2(i)] if o["addr2"] else [])
    out = []
    k = o["group"]
    for g in range(0, n, k):
        members = range(g, min(n, g + k))
        all_addrs = [a for i in members for a in addrs(i)]
        if k == 1:
            name = names(o, g)[0]
            chains = [{"filters": [ads_hcm(o, g, changed)]}]
        else:
            name = f"default/group-{g // k}"
            chains = [{"name": names(o, i)[0],
                       "filter_chain_match": {"prefix_ranges": [{"address_prefix": a, "prefix_len": 32} for a in addrs(i)], "destination_port": 80},
                       "filters": [ads_hcm(o, i, changed)]} for i in members]
        l = {"@type": LST, "name": name, "address": sa(all_addrs[0], 80), "bind_to_port": False, "filter_chains": chains}
        if len(all_addrs) > 1:
            l["additional_addresses"] = [{"address": sa(a, 80)} for a in all_addrs[1:]]
        if o["balance"]:
            l["connection_balance_config"] = {"exact_balance": {}}
        out.append(l)
    return out

def ads_clusters(o, n):
    out = []
    for i in range(n):
        c = names(o, i)[2]
        if o["clusters"] == "eds":
            out.append({"@type": CL, "name": c, "type": "EDS", "connect_timeout": "2s", "eds_cluster_config": {"eds_config": ads_source()}})
        elif o["clusters"] == "static":
            out.append({"@type": CL, "name": c, "type": "STATIC", "connect_timeout": "2s", "load_assignment": assignment(c)})
    return out

def assignment(c):
    return {"cluster_name": c, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": sa("127.0.0.1", BACKEND_PORT)}}]}]}

class Protos:
    """Envoy's messages, from the descriptors weft's build ships (no generated Python code)."""
    def __init__(self):
        from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
        path = os.environ.get("WEFT_ENVOY_DESCRIPTORS") or next(iter(sorted(
            glob.glob("/var/cache/weft/target*/*/build/weft-agent-*/out/envoy_descriptors.bin"), key=os.path.getmtime, reverse=True)), None)
        if not path:
            raise SystemExit("no envoy_descriptors.bin: build weft-agent, or set WEFT_ENVOY_DESCRIPTORS")
        files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(open(path, "rb").read()).file}
        self.pool, added = descriptor_pool.DescriptorPool(), set()
        def add(name):
            if name in added or name not in files: return
            added.add(name)
            for dep in files[name].dependency: add(dep)
            self.pool.Add(files[name])
        for name in files: add(name)
        self.json_format, self.factory = json_format, message_factory
        self.Response = self.cls("envoy.service.discovery.v3.DiscoveryResponse")
        self.Request = self.cls("envoy.service.discovery.v3.DiscoveryRequest")

    def cls(self, full):
        return self.factory.GetMessageClass(self.pool.FindMessageTypeByName(full))

    def encode(self, doc):
        """A resource document ("@type" and fields) as Any-ready bytes."""
        doc = dict(doc)
        type_url = doc.pop("@type")
        msg = self.cls(type_url.rsplit("/", 1)[1])()
        self.json_format.ParseDict(doc, msg, descriptor_pool=self.pool)
        return type_url, msg.SerializeToString()

class Ads:
    """A state-of-the-world ADS server for one Envoy: LDS and CDS are wildcard (everything is
    sent), RDS and EDS answer the names Envoy asks for. ACKs are recorded per type."""
    def __init__(self, protos):
        self.p = protos
        self.lock = threading.Condition()
        self.res = {LST: {}, RC: {}, CL: {}, CLA: {}}  # type -> name -> (type_url, bytes)
        self.version = {t: 0 for t in self.res}
        self.acked = {t: 0 for t in self.res}
        self.ack_at = {t: None for t in self.res}
        self.nacks = []
        self.streams = []

    def set(self, type_url, docs):
        enc = {d.get("name") or d["cluster_name"]: self.p.encode(d) for d in docs}
        with self.lock:
            self.res[type_url] = enc
            self.version[type_url] += 1
            for s in self.streams: s.put(("push", type_url))

    def wait_acked(self, types, limit):
        with self.lock:
            ok = self.lock.wait_for(lambda: all(self.acked[t] == self.version[t] for t in types) or self.nacks, limit)
            if self.nacks: raise SystemExit(f"NACK: {self.nacks[0]}")
            if not ok: raise SystemExit("timeout waiting for ACKs")

    def response(self, type_url, want):
        with self.lock:
            have = self.res[type_url]
            chosen = have.values() if want is None else [have[n] for n in sorted(want) if n in have]
            r = self.p.Response(version_info=str(self.version[type_url]), type_url=type_url,
                                nonce=f"{type_url[-8:]}-{self.version[type_url]}")
            for t, b in chosen:
                r.resources.add(type_url=t, value=b)
            return r

    def stream(self, requests, context):
        q = queue.Queue()
        with self.lock: self.streams.append(q)
        def read():
            try:
                for req in requests: q.put(("req", req))
            except Exception: pass  # the stream ended with Envoy
            finally: q.put(("end", None))
        threading.Thread(target=read, daemon=True).start()
        asked, sent = {}, {}  # type -> names asked (None: wildcard); type -> (version, names) sent
        while True:
            kind, x = q.get()
            if kind == "end": return
            if kind == "req":
                t = x.type_url
                if t not in self.res: continue
                if x.HasField("error_detail") and x.error_detail.code:
                    with self.lock:
                        self.nacks.append(x.error_detail.message[:2000]); self.lock.notify_all()
                    continue
                if x.response_nonce and x.version_info:
                    with self.lock:
                        v = int(x.version_info)
                        if v > self.acked[t]:
                            self.acked[t], self.ack_at[t] = v, time.time()
                            self.lock.notify_all()
                asked[t] = None if t in (LST, CL) else frozenset(x.resource_names)
            else:
                t = x
                if t not in asked: continue
            with self.lock: key = (self.version[t], asked[t])
            if sent.get(t) != key and self.version[t] > 0 and (asked[t] is None or asked[t]):
                sent[t] = key
                yield self.response(t, asked[t])

def ads_server(ads, protos):
    import grpc
    from concurrent import futures
    handler = grpc.method_handlers_generic_handler("envoy.service.discovery.v3.AggregatedDiscoveryService", {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            ads.stream, request_deserializer=protos.Request.FromString, response_serializer=lambda m: m.SerializeToString())})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{ADS_PORT}")
    server.start()
    return server

def backend():
    """The endpoint every cluster has: answers 200 "backend"."""
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", BACKEND_PORT)); srv.listen(64)
    def serve():
        while True:
            c, _ = srv.accept()
            try:
                c.recv(65536)
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nbackend")
            finally: c.close()
    threading.Thread(target=serve, daemon=True).start()

def run_ads(variant, o, n, workers, protos):
    d = f"{WORK}/run-{variant.replace('+', '_')}-{n}"
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d + "/xds")
    files = o["files"]
    boot = {"node": {"id": "x", "cluster": "x"}, "admin": {"address": sa("127.0.0.1", 9901)}}
    if files:
        lds, cds = d + "/xds/lds.json", d + "/xds/cds.json"
        write_json(lds, {"version_info": "0", "resources": []}); write_json(cds, {"version_info": "0", "resources": []})
        boot["dynamic_resources"] = {k: {"path_config_source": {"path": f, "watched_directory": {"path": d + "/xds"}}, "resource_api_version": "V3"}
                                     for k, f in (("lds_config", lds), ("cds_config", cds))}
    else:
        boot["dynamic_resources"] = {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "lds_config": ads_source(), "cds_config": ads_source()}
        boot["static_resources"] = {"clusters": [{"name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": sa("127.0.0.1", ADS_PORT)}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}}]}
    if o["nostats"]:
        boot["stats_config"] = {"stats_matcher": {"reject_all": True}}
    if o["lean"]:
        boot["stats_config"] = {"stats_matcher": {"inclusion_list": {"patterns": LEAN_STATS}}}
    if o["deferred"]:
        boot["deferred_stat_options"] = {"enable_deferred_creation_stats": True}
    dispatcher = dispatch_listener([hcm(-1, "no-listener")])
    mid = n // 2
    ls = [dispatcher] + ([] if o["clustersonly"] else ads_listeners(o, n))
    cs = ads_clusters(o, n)
    want = len(ls)
    ads = Ads(protos)
    server = None if files else ads_server(ads, protos)
    p = start_envoy(d, boot, workers)
    try:
        deadline = time.time() + LIMIT_S
        if not files:  # Envoy's first requests are answered (empty) so that it starts its workers
            ads.set(LST, []); ads.set(CL, [])
        wait_ready(60)
        base_rss, _ = rss_fds(p.pid)
        # Everything is encoded before the clock starts.
        if not files:
            if o["routes"] == "rds" and not o["clustersonly"]:
                ads.set(RC, [{"@type": RC, **route_config(o, i, None)} for i in range(n)])
            if o["clusters"] == "eds":
                ads.set(CLA, [{"@type": CLA, **assignment(names(o, i)[2])} for i in range(n)])
            batches = [want] if not o["batch"] else list(range(1 + o["batch"], want, o["batch"])) + [want]
        # Envoy's admin interface does not answer while its main thread applies an update, so
        # the phases are timed by the ACKs: CDS, LDS (listeners created, warming), RDS and EDS
        # (routes and endpoints applied: listeners and clusters warm).
        rec = perf_start(p.pid, d)
        cpu0 = cpu_s(p.pid)
        t0 = time.time()
        if files:
            write_json(cds, {"version_info": "1", "resources": cs})
            write_json(lds, {"version_info": "1", "resources": ls})
            _, s = wait(lambda s: s.get("listener_manager.total_listeners_active", 0) == want
                        and s.get("cluster_manager.active_clusters", 0) == len(cs)
                        or s.get("listener_manager.lds.update_rejected", 0) + s.get("cluster_manager.cds.update_rejected", 0) > 0,
                        deadline - time.time())
            if s.get("listener_manager.lds.update_rejected", 0) + s.get("cluster_manager.cds.update_rejected", 0):
                print(open(d + "/log").read()[-2000:]); raise SystemExit(f"{variant}: rejected")
        else:
            if cs: ads.set(CL, cs)
            per_batch = []
            for upto in batches:
                c1 = cpu_s(p.pid)[0]
                ads.set(LST, ls[:upto])
                ads.wait_acked([LST], deadline - time.time())
                per_batch.append(round(cpu_s(p.pid)[0] - c1, 2))
            types = [LST] + ([CL] if cs else []) + ([RC] if o["routes"] == "rds" and not o["clustersonly"] else []) + ([CLA] if o["clusters"] == "eds" else [])
            ads.wait_acked(types, deadline - time.time())
            if o["nostats"]:  # no stats to read: the listeners Envoy lists as active
                while active_listeners() < want:
                    if time.time() > deadline: raise SystemExit("timeout")
                    time.sleep(0.02)
            else:
                wait(lambda s: s.get("listener_manager.total_listeners_active", 0) == want and s.get("listener_manager.total_listeners_warming", 1) == 0
                     and s.get("cluster_manager.warming_clusters", 1) == 0, deadline - time.time())
        t_load = time.time() - t0
        cpu = [round(b - a, 2) for a, b in zip(cpu0, cpu_s(p.pid))]
        perf_stop(rec, d)
        acks = {k: round(ads.ack_at[t] - t0, 2) for k, t in (("cds", CL), ("lds", LST), ("rds", RC), ("eds", CLA))
                if not files and ads.ack_at[t] and ads.ack_at[t] >= t0}
        rss, fds = rss_fds(p.pid)
        answer = "" if o["clustersonly"] else get(vip(mid))
        # one config changed among n: its routes (over RDS, or inline: its listener)
        t1 = time.time()
        if files:
            ok = stats()["listener_manager.lds.update_success"]
            write_json(lds, {"version_info": "2", "resources": [dispatcher] + ads_listeners(o, n, changed=mid)})
            wait(lambda s: s["listener_manager.lds.update_success"] > ok, deadline - time.time())
        elif o["clustersonly"]:
            pass
        elif o["routes"] == "rds":
            ads.set(RC, [{"@type": RC, **route_config(o, i, mid)} for i in range(n)])
            t1 = time.time()  # encoding all N routes again is this script's cost, not Envoy's
            ads.wait_acked([RC], deadline - time.time())
        else:
            ads.set(LST, [dispatcher] + ads_listeners(o, n, changed=mid))
            t1 = time.time()
            ads.wait_acked([LST], deadline - time.time())
            if not o["nostats"]:
                wait(lambda s: s.get("listener_manager.total_listeners_warming", 1) == 0, deadline - time.time())
        t_change = time.time() - t1
        # the same listeners again under a new version (state of the world re-sends every listener
        # when any one changes): what Envoy spends on N unchanged listeners
        noop = None
        if not files:
            ads.set(LST, ls)
            c1, t1 = cpu_s(p.pid)[0], time.time()
            ads.wait_acked([LST], deadline - time.time())
            noop = (round(time.time() - t1, 3), round(cpu_s(p.pid)[0] - c1, 3))
        answer_v2 = get(vip(mid)) if o["clusters"] == "none" else ""
        out = {"variant": variant, "n": n, "listeners": want, "workers": workers, "load_s": round(t_load, 2), "cpu_main_s": cpu[0], "cpu_all_s": cpu[1], "acked_at_s": acks,
               "loadavg": open("/proc/loadavg").read().split()[0],
               "rss_mib": rss, "rss_base_mib": base_rss, "fds": fds, "change_s": round(t_change, 3), "answer": answer}
        if not files and o["batch"]: out["batch_cpu_main_s"] = per_batch
        if noop: out["lds_unchanged_s"], out["lds_unchanged_cpu_s"] = noop
        if answer_v2: out["answer_after"] = answer_v2
        print(json.dumps(out), flush=True)
        return out
    finally:
        stop_envoy(p)
        if server: server.stop(0)

def fit(points):
    """time(N) = a + b*N + c*N^2 through three points (least squares over more)."""
    xs = [(1.0, n, n * n) for n, _ in points]; ys = [t for _, t in points]
    # normal equations, 3x3, by Cramer's rule
    m = [[sum(x[i] * x[j] for x in xs) for j in range(3)] for i in range(3)]
    v = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(3)]
    det = lambda a: (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                     + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    d = det(m)
    if abs(d) < 1e-9: return None
    coef = []
    for k in range(3):
        mk = [row[:] for row in m]
        for i in range(3): mk[i][k] = v[i]
        coef.append(det(mk) / d)
    return coef

if __name__ == "__main__":
    if os.environ.get("WEFT_SHAPES_NETNS") is None:
        ns = f"weft-shapes-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            env = dict(os.environ, WEFT_SHAPES_NETNS=ns)
            sys.exit(subprocess.run(["ip", "netns", "exec", ns, sys.executable] + sys.argv, env=env).returncode)
        finally:
            subprocess.run(["ip", "netns", "del", ns])
            shutil.rmtree(WORK, ignore_errors=True)
    h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for net in ("10.97.0.0/16", "10.98.0.0/16"):
        subprocess.run(["ip", "route", "replace", "local", net, "dev", "lo"], check=True)
    ns_ = [int(x) for x in sys.argv[2].split(",")]; workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    protos = None
    results = {}
    for variant in sys.argv[1].split(","):
        o = parse_variant(variant)
        for n in ns_:
            if o is None:
                r = run_files(variant, n, workers)
            else:
                if protos is None:
                    protos = Protos(); backend()
                r = run_ads(variant, o, n, workers, protos)
            results.setdefault(variant, []).append((n, r["load_s"], r.get("cpu_main_s")))
    for variant, pts in results.items():
        for what, k in (("load_s", 1), ("cpu_main_s", 2)):
            xy = [(p[0], p[k]) for p in pts if p[k] is not None]
            c = fit(xy) if len(xy) >= 3 else None
            if c:
                print(json.dumps({"variant": variant, "fit": f"{what} = a + b*N + c*N^2", "a_s": round(c[0], 2), "b_ms": round(c[1] * 1e3, 3),
                                  "c_us": round(c[2] * 1e6, 4), "points": xy}), flush=True)
