//! Helper processes for the lab: clients that must run as separate processes
//! (in a node's cgroup, so the node's socket hooks apply to them).
//!
//! `weft-lab demo [SECONDS]`: the demo (see tests/src/demo.rs).
//! `weft-lab get ADDR [PATH] [COUNT]`: COUNT requests, each on a new
//! connection; one line per request: `status=.. local=.. peer=.. <server body>`.
//! `weft-lab latency ADDR COUNT keepalive|new`: COUNT timed requests; one
//! line per request with its latency in nanoseconds.
//! `weft-lab connect-unix PATH...`: connects to each unix socket; one line
//! per socket: `PATH ok`, `PATH denied` (permission) or `PATH error=..`
//! (run as another user, it shows who may connect).
//! `weft-lab append PATH`: opens a file to append to; prints `ok`, `denied`
//! or `error=..`.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use weft_tests::http::Client;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("get") => get(&args[1..]),
        Some("latency") => latency(&args[1..]),
        Some("append") => {
            let path = args.get(1).map(String::as_str).unwrap_or_default();
            match std::fs::OpenOptions::new().append(true).open(path) {
                Ok(_) => println!("ok"),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => println!("denied"),
                Err(e) => println!("error={e}"),
            }
            ExitCode::SUCCESS
        }
        Some("connect-unix") => {
            for path in &args[1..] {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => println!("{path} ok"),
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => println!("{path} denied"),
                    Err(e) => println!("{path} error={e}"),
                }
            }
            ExitCode::SUCCESS
        }
        Some("demo") => {
            let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
            match weft_tests::demo::run(Duration::from_secs(secs)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft-lab demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: weft-lab demo [SECONDS] | weft-lab get ADDR [PATH] [COUNT]");
            ExitCode::from(2)
        }
    }
}

fn get(args: &[String]) -> ExitCode {
    let Some(Ok(to)) = args.first().map(|a| a.parse::<SocketAddr>()) else {
        eprintln!("weft-lab get: ADDR must be ip:port");
        return ExitCode::from(2);
    };
    let path = args.get(1).map(String::as_str).unwrap_or("/");
    let count: u32 = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_secs(3);
    let mut failed = false;
    for _ in 0..count {
        let res = std::net::TcpStream::connect_timeout(&to, timeout)
            .and_then(|s| Client::from_stream(s, timeout))
            .and_then(|mut c| {
                let (local, peer) = (c.local()?, c.peer()?);
                let r = c.get(&to.to_string(), path, &[("connection", "close")])?;
                Ok((r, local, peer))
            });
        match res {
            Ok((r, local, peer)) => println!("status={} local={local} peer={peer} {}", r.status, r.body.trim()),
            Err(e) => {
                println!("error={e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn latency(args: &[String]) -> ExitCode {
    let (Some(Ok(to)), Some(Ok(count)), Some(mode)) =
        (args.first().map(|a| a.parse::<SocketAddr>()), args.get(1).map(|c| c.parse::<usize>()), args.get(2))
    else {
        eprintln!("usage: weft-lab latency ADDR COUNT keepalive|new");
        return ExitCode::from(2);
    };
    let timeout = Duration::from_secs(3);
    let connect = || std::net::TcpStream::connect_timeout(&to, timeout).and_then(|s| Client::from_stream(s, timeout));
    let mut out = String::with_capacity(count * 8);
    let res: std::io::Result<()> = (|| {
        if mode == "keepalive" {
            let mut c = connect()?;
            for _ in 0..200 {
                c.get("b", "/", &[])?;
            }
            for _ in 0..count {
                let t = std::time::Instant::now();
                c.get("b", "/", &[])?;
                out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
            }
        } else {
            for _ in 0..count {
                let t = std::time::Instant::now();
                let mut c = connect()?;
                c.get("b", "/", &[("connection", "close")])?;
                out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
            }
        }
        Ok(())
    })();
    print!("{out}");
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-lab latency: {e}");
            ExitCode::FAILURE
        }
    }
}
