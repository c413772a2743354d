//! `weft-agent`: parse the command line, set up logging, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use weft_agent::{config::AgentConfig, datapath::Datapath};

/// jemalloc, not glibc's malloc: at 10,000 EnvoyConfigs the agent holds
/// about two million small allocations, and glibc's per-chunk header and
/// free lists cost about 27 MiB more resident memory for the same heap
/// (benches/results/REPORT.md, issue 12).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: a background thread gives
/// pages unused for a second back to the system. With jemalloc's default
/// (kept ten seconds, purged only when the agent allocates again) an idle
/// agent kept what its start freed: 67 MiB resident against glibc's 52.
/// Giving them back at once (decay 0) cost the flow path 1-3 % of a core
/// at 10,000 flows/s: its buffers are freed and taken again every batch.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: a pointer to a string literal, never written.
unsafe impl Sync for MallocConf {}
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

#[derive(Parser)]
#[command(name = "weft-agent", version, about = "weft node agent: eBPF datapath, xDS control plane, flows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on this node.
    Run {
        /// Agent configuration file (YAML); defaults apply to what it leaves out.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides objects-dir.
        #[arg(long)]
        objects_dir: Option<PathBuf>,
        /// Overrides node-name.
        #[arg(long)]
        node_name: Option<String>,
        /// Overrides netns.
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Check EnvoyConfigs (and the Services and Secrets they use) in files or
    /// directories, offline, as the agent would before pushing them to Envoy.
    /// Exit status 0: all valid; 1: problems (one line each).
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the operator: EnvoyConfig status for the cluster and Ingress
    /// translation, one leader at a time (a Lease).
    Operator {
        /// A kubeconfig file; default: in-cluster, else $KUBECONFIG or ~/.kube/config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Namespace of the Lease and of shared-mode Ingress objects.
        #[arg(long, default_value = "weft-system")]
        namespace: String,
        /// This replica's identity; default: $POD_NAME.
        #[arg(long)]
        identity: Option<String>,
        /// How long the leader holds the Lease without renewing it, in
        /// seconds (a takeover waits this long).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600), default_value = "15")]
        lease_duration: u64,
        /// Keep the flow API's CA, per-node server certificates and client
        /// certificate in Secrets of --namespace (weft-flows-ca,
        /// weft-flows-server, weft-flows-client), renewed before they expire.
        #[arg(long)]
        flow_certs: bool,
        /// The cluster's name, in the flow API's certificate names
        /// (`<node>.<cluster>.hubble-grpc.weft.io`).
        #[arg(long, default_value = "default")]
        cluster_name: String,
    },
    /// Print weft's CustomResourceDefinitions (YAML), generated from its types.
    Crds {
        /// Print Cilium's CiliumEnvoyConfig and CiliumClusterwideEnvoyConfig
        /// CRDs instead (for clusters without Cilium).
        #[arg(long)]
        cilium: bool,
    },
    /// Remove every pin of the datapath (maps and links): weft's programs stop
    /// on this node. The proxy's routing rule (fwmark) and table stay; without
    /// the programs nothing carries the mark they match.
    DatapathReset {
        #[arg(long, default_value = "/sys/fs/bpf/weft")]
        bpffs_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Not on the main thread, whose stack is whatever `ulimit -s` says: every
    // thread that reads input has the stack the depth limits were made for.
    let result = weft_agent::limits::thread("main")
        .spawn(move || real_main(cli))
        .map_err(anyhow::Error::from)
        .and_then(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, objects_dir, node_name, netns } => {
            let mut cfg = match config {
                Some(p) => AgentConfig::load(&p)?,
                None => AgentConfig::default(),
            };
            if let Some(d) = objects_dir {
                cfg.objects_dir = d;
            }
            if let Some(n) = node_name {
                cfg.node_name = n;
            }
            if let Some(n) = netns {
                cfg.netns = Some(n);
            }
            cfg.validate()?;
            weft_agent::run::run(cfg)
        }
        Command::Validate { paths } => {
            let report = weft_agent::validate::validate(&paths);
            for p in &report.problems {
                println!("{p}");
            }
            eprintln!(
                "{} EnvoyConfig(s), {} valid, {} problem(s)",
                report.configs,
                report.valid,
                report.problems.len()
            );
            if !report.problems.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Operator { kubeconfig, namespace, identity, lease_duration, flow_certs, cluster_name } => {
            let mut opts = weft_agent::operator::OperatorOptions {
                namespace,
                lease_duration: std::time::Duration::from_secs(lease_duration),
                flow_certs: flow_certs.then(weft_agent::operator::flowcerts::Lifetimes::default),
                cluster_name,
                ..Default::default()
            };
            if let Some(id) = identity {
                opts.identity = id;
            }
            let rt = weft_agent::limits::runtime(2)?;
            rt.block_on(async {
                let client = weft_agent::k8s::source::client(kubeconfig.as_deref()).await?;
                weft_agent::operator::run(client, opts).await
            })
        }
        Command::Crds { cilium } => {
            use weft_agent::k8s::crd::{cilium_crds_yaml, crds_yaml};
            print!("{}", if cilium { cilium_crds_yaml() } else { crds_yaml() });
            Ok(())
        }
        Command::DatapathReset { bpffs_dir } => {
            Datapath::remove_pins(&bpffs_dir)?;
            Ok(())
        }
    }
}
