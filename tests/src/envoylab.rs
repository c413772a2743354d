//! A lab with HTTP servers in three pods (n1-p2, n2-p1, n2-p2, port 8080)
//! and agents, each running its node's Envoy, on both nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use weft_agent::{
    k8s::yaml::{self, Loaded},
    xds::envoyconfig,
};

use crate::{
    http::{Client, HttpServer, ServerOpts},
    lab::Lab,
    objects::{AgentFiles, agent_files, envoy_serves, start_agent_with_env, wait_ready, wait_status, write_atomic},
    scenario::{T, sa},
};

/// A lab with HTTP servers in three pods and agents (with Envoy) on both nodes.
pub struct EnvoyLab {
    pub lab: Lab,
    pub files: Vec<AgentFiles>,
    pub pids: Vec<u32>,
    pub servers: Vec<HttpServer>,
}

impl EnvoyLab {
    pub fn new(objects: impl Fn(&Lab) -> String) -> Self {
        Self::with_config(objects, "")
    }

    /// Like `new`, with extra agent configuration (YAML lines).
    pub fn with_config(objects: impl Fn(&Lab) -> String, agent_config: &str) -> Self {
        Self::with_agent_env(objects, agent_config, [Vec::new(), Vec::new()])
    }

    /// Like `with_config`, each node's agent with extra environment variables.
    pub fn with_agent_env(
        objects: impl Fn(&Lab) -> String,
        agent_config: &str,
        env: [Vec<(String, String)>; 2],
    ) -> Self {
        let lab = Lab::new().unwrap();
        let objects = objects(&lab);
        let servers = ["n1-p2", "n2-p1", "n2-p2"]
            .iter()
            .map(|p| {
                let pod = lab.pod(p);
                HttpServer::start(
                    &pod.netns,
                    sa(pod.ip, 8080),
                    ServerOpts { name: p.to_string(), ..Default::default() },
                )
                .unwrap()
            })
            .collect();
        let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, agent_config).unwrap()).collect();
        write_atomic(&files[0].objects_dir.join("lab.yaml"), &objects).unwrap();
        let mut pids = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let log = lab.run_dir.join(format!("agent{i}.log"));
            pids.push(start_agent_with_env(&lab, i, f, &log, &env[i]).unwrap());
        }
        let me = Self { lab, files, pids, servers };
        for i in 0..2 {
            wait_ready(&me.files[i], Duration::from_secs(30), || me.lab.running(me.pids[i]))
                .unwrap_or_else(|e| me.fail(e));
        }
        me
    }

    pub fn fail(&self, e: impl std::fmt::Display) -> ! {
        let log = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let ready = Client::connect(&self.lab.node(0).netns, "127.0.0.1:9901".parse().unwrap(), None, T)
            .and_then(|mut c| c.get("admin", "/ready", &[("connection", "close")]));
        panic!(
            "{e}\n--- envoy /ready: {ready:?}\n--- agent log\n{}\n--- envoy log\n{}",
            log(self.lab.run_dir.join("agent0.log")),
            log(self.files[0].state_dir.join("envoy.log"))
        );
    }

    /// Waits until node1's agent says Envoy acknowledged `object` and its
    /// datapath hands the L7 frontends to Envoy.
    pub fn acked(&self, object: &str) -> serde_json::Value {
        wait_status(&self.lab, 0, Duration::from_secs(30), &format!("{object} acknowledged and served"), |s| {
            envoy_serves(s, object)
        })
        .unwrap_or_else(|e| self.fail(e))
    }

    /// Replaces the objects both agents read and waits until each applied
    /// them: its report says the source handed over a change since (its
    /// `source-generation` grew), its datapath applied the version that
    /// report was built at, and the report lists the EnvoyConfigs `objects`
    /// holds. A newer datapath version alone may come from an ADS event or
    /// a CNI ADD that arrived before the agent read the file (policies
    /// changed then reached the datapath only a build later); a report that
    /// no longer lists a removed config comes after the datapath stopped
    /// handing its Services to Envoy.
    pub fn apply(&self, objects: &str) {
        let generation = |i: usize| {
            let s = crate::objects::agent_status(&self.lab, i).unwrap_or_else(|e| self.fail(e));
            s["control"]["source-generation"]
                .as_u64()
                .unwrap_or_else(|| self.fail(format!("no source-generation: {s}")))
        };
        let before: Vec<u64> = (0..2).map(generation).collect();
        let wanted = configs_in(objects);
        write_atomic(&self.objects_file(), objects).unwrap_or_else(|e| self.fail(e));
        for (i, b) in before.iter().enumerate() {
            wait_status(&self.lab, i, Duration::from_secs(30), "the new objects applied", |s| {
                let read = s["control"]["source-generation"].as_u64().is_some_and(|g| g > *b);
                let built = s["control"]["version"].as_u64().unwrap_or(u64::MAX);
                read && s["datapath"]["applied-version"].as_u64().is_some_and(|v| v >= built)
                    && wanted.as_ref().is_none_or(|w| *w == user_configs(s))
            })
            .unwrap_or_else(|e| self.fail(e));
        }
    }

    pub fn objects_file(&self) -> std::path::PathBuf {
        self.files[0].objects_dir.join("lab.yaml")
    }

    /// The server of a pod (n1-p2, n2-p1, n2-p2).
    pub fn server(&self, pod: &str) -> &HttpServer {
        let i = ["n1-p2", "n2-p1", "n2-p2"].iter().position(|p| *p == pod).expect("a server pod");
        &self.servers[i]
    }

    /// `n` requests on one connection from n1-p1; how many each backend answered.
    pub fn spread(
        &self,
        to: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        n: usize,
    ) -> BTreeMap<String, usize> {
        let client = self.lab.pod("n1-p1");
        let mut c = Client::connect(&client.netns, to, None, T).unwrap_or_else(|e| self.fail(e));
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let r = c.get("svc", path, headers).unwrap_or_else(|e| self.fail(e));
            assert_eq!(r.status, 200, "{r:?}");
            *out.entry(r.field("name").unwrap_or("?").to_owned()).or_default() += 1;
        }
        out
    }
}

/// The EnvoyConfigs (of any spelling) in `objects`, as the agent's report
/// names them; None when the text is broken as a whole (the agent then keeps
/// what it had).
fn configs_in(objects: &str) -> Option<BTreeSet<String>> {
    let mut loaded = Loaded::default();
    yaml::load_text(Path::new("lab.yaml"), objects, &mut loaded);
    if loaded.problems.iter().any(|p| p.error.whole_file()) {
        return None;
    }
    let key = |doc: &std::sync::Arc<envoyconfig::ConfigDoc>| match &doc.parsed {
        Ok(c) => Some(c.key.clone()),
        Err(e) => e.key.clone(),
    };
    Some(loaded.configs.iter().filter_map(key).map(|k| k.to_string()).collect())
}

/// The EnvoyConfigs a report lists, without the ones the agent generates.
fn user_configs(status: &serde_json::Value) -> BTreeSet<String> {
    status["control"]["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["object"].as_str())
        .filter(|name| name.starts_with("EnvoyConfig ") || name.starts_with("ClusterwideEnvoyConfig "))
        .filter(|name| !name.contains("weft:"))
        .map(str::to_owned)
        .collect()
}
