//! The exporter's settings as every OpenTelemetry exporter takes them: the
//! agent's `flows.otlp` options first, then the standard `OTEL_EXPORTER_OTLP_*`
//! and `OTEL_RESOURCE_ATTRIBUTES` environment variables (signal-specific ones
//! before general ones, as the OpenTelemetry specification orders them), then
//! weft's defaults. Each signal (logs, traces) gets its own [`Transport`], so a
//! signal-specific endpoint, header, certificate or protocol applies to it
//! alone.
//!
//! Everything is checked here, where it is known which key or variable a value
//! came from: errors name it (and never print a header's value).

use std::{
    collections::BTreeMap,
    fmt,
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{Compression, OtlpConfig, OtlpError, Protocol, Signal, Transport};

/// The largest file read for a certificate, key or header file: a misnamed
/// path must not read a disk into memory.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The default per-request timeout (ms) when neither the config nor the
/// environment sets one (the OpenTelemetry specification's default).
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// `flows.otlp` in the agent's config. Every transport setting is optional:
/// unset, the environment decides, then the default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtlpOptions {
    /// The collector. grpc: `http://host:4317` or `https://host:4317` (no
    /// scheme: `https`, unless `insecure`); http/protobuf: the base URL,
    /// `/v1/logs` and `/v1/traces` are appended. Default:
    /// `$OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://127.0.0.1:4317` (grpc) or
    /// `http://127.0.0.1:4318` (http/protobuf).
    pub endpoint: Option<String>,
    /// Where log records go, used as written (http/protobuf: the whole URL).
    /// Default: from `endpoint`, else `$OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`.
    pub logs_endpoint: Option<String>,
    /// Where spans go, used as written. Default: from `endpoint`, else
    /// `$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    pub traces_endpoint: Option<String>,
    /// grpc or http/protobuf. Default: `$OTEL_EXPORTER_OTLP_PROTOCOL`, else grpc.
    pub protocol: Option<String>,
    /// Headers sent with every request (an API key, a tenant); never logged.
    /// Added to those of `$OTEL_EXPORTER_OTLP_HEADERS` (these win).
    pub headers: BTreeMap<String, String>,
    /// A file of `Name: value` lines, one header each (a mounted Secret);
    /// read once at start, never logged. These win over `headers`.
    pub headers_file: Option<PathBuf>,
    /// PEM CA certificates trusted for an `https://` collector, besides the
    /// system's. Default: `$OTEL_EXPORTER_OTLP_CERTIFICATE`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for a collector that requires mutual
    /// TLS. Default: `$OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client-cert-file`. Default:
    /// `$OTEL_EXPORTER_OTLP_CLIENT_KEY`.
    pub client_key_file: Option<PathBuf>,
    /// grpc with an endpoint without a scheme: plaintext instead of TLS.
    /// Default: `$OTEL_EXPORTER_OTLP_INSECURE`, else false.
    pub insecure: Option<bool>,
    /// gzip or none. Default: `$OTEL_EXPORTER_OTLP_COMPRESSION`, else none.
    pub compression: Option<String>,
    /// Per request, ms. Default: `$OTEL_EXPORTER_OTLP_TIMEOUT`, else 10000.
    pub timeout_ms: Option<u64>,
    /// Resource attributes added to weft's own (`service.name`,
    /// `service.version`, `k8s.node.name`, `k8s.cluster.name`,
    /// `host.name`); added to those of `$OTEL_RESOURCE_ATTRIBUTES` (these win).
    pub resource_attributes: BTreeMap<String, String>,
    /// Flows waiting to be sent; more are dropped and counted. Default: 8192.
    pub queue_size: Option<usize>,
    /// Flows per request. Default: 512.
    pub batch_size: Option<usize>,
    /// Longest wait before a partial batch goes out, ms. Default: 1000.
    pub interval_ms: Option<u64>,
    /// How long a batch is retried before it is dropped (and counted), ms.
    /// Default: 30000.
    pub retry_ms: Option<u64>,
    /// Export only flows matching one of these Hubble FlowFilters (JSON or
    /// YAML maps with Hubble's field names, e.g. {verdict: [DROPPED]}).
    /// Default: every flow.
    pub allow: Vec<serde_json::Value>,
    /// Never export flows matching one of these.
    pub deny: Vec<serde_json::Value>,
}

/// Where environment variables come from: the process's, or a test's map.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Whether the environment alone asks for OTLP export (an endpoint is set),
/// for an agent whose config has no `flows.otlp`.
pub fn enabled_by_env(env: &dyn Env) -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| env.var(v).is_some_and(|s| !s.trim().is_empty()))
}

/// Largest flow store, queue or batch: each is allocated up front, so a
/// mistyped size must not ask for all the node's memory.
pub const MAX_QUEUE: usize = 1 << 24;

/// A value and where it came from, for errors.
struct Found {
    value: String,
    from: &'static str,
}

fn invalid(key: &'static str, value: impl fmt::Display, reason: impl fmt::Display) -> OtlpError {
    OtlpError::Setting { key, value: value.to_string(), reason: reason.to_string() }
}

impl OtlpOptions {
    /// The exporter's settings, from these options, then `env`, then the
    /// defaults. Errors name the config key or environment variable.
    pub fn resolve(&self, env: &dyn Env) -> Result<OtlpConfig, OtlpError> {
        let filters = |key: &'static str, l: &[serde_json::Value]| {
            l.iter()
                .map(|v| weft_flow::json::flow_filter(v).map_err(|r| invalid(key, v, r)))
                .collect::<Result<Vec<_>, _>>()
        };
        let size = |key: &'static str, v: Option<usize>, default: usize| match v.unwrap_or(default) {
            n @ 1..=MAX_QUEUE => Ok(n),
            n => Err(invalid(key, n, format!("must be from 1 to {MAX_QUEUE}"))),
        };
        let queue = size("flows.otlp.queue-size", self.queue_size, 8192)?;
        let batch = size("flows.otlp.batch-size", self.batch_size, 512)?;
        Ok(OtlpConfig {
            logs: self.transport(Signal::Logs, env)?,
            traces: self.transport(Signal::Traces, env)?,
            resource: self.resource(env)?,
            queue,
            batch,
            interval: Duration::from_millis(self.interval_ms.unwrap_or(1000)),
            retry_for: Duration::from_millis(self.retry_ms.unwrap_or(30_000)),
            allow: filters("flows.otlp.allow", &self.allow)?,
            deny: filters("flows.otlp.deny", &self.deny)?,
        })
    }

    /// A setting: the config's value, else the signal's variable, else the
    /// general one.
    fn pick(
        &self,
        configured: Option<(&'static str, String)>,
        var: &'static str,
        signal: Signal,
        env: &dyn Env,
    ) -> Option<Found> {
        if let Some((from, value)) = configured {
            return Some(Found { value, from });
        }
        let specific = signal_var(var, signal);
        if let Some(value) = env.var(specific).filter(|v| !v.trim().is_empty()) {
            return Some(Found { value, from: specific });
        }
        env.var(var).filter(|v| !v.trim().is_empty()).map(|value| Found { value, from: var })
    }

    fn transport(&self, signal: Signal, env: &dyn Env) -> Result<Transport, OtlpError> {
        let path_setting = |key: &'static str, p: &Option<PathBuf>| p.as_ref().map(|p| (key, p.display().to_string()));
        let protocol = match self.pick(
            self.protocol.clone().map(|p| ("flows.otlp.protocol", p)),
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            signal,
            env,
        ) {
            None => Protocol::Grpc,
            Some(f) => Protocol::parse(f.value.trim()).map_err(|r| invalid(f.from, &f.value, r))?,
        };
        let endpoint = self.endpoint(signal, protocol, env)?;
        let ca_pem = match self.pick(
            path_setting("flows.otlp.ca-file", &self.ca_file),
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            signal,
            env,
        ) {
            Some(f) => Some(read_pem(&f, "CERTIFICATE")?),
            None => None,
        };
        let cert = self.pick(
            path_setting("flows.otlp.client-cert-file", &self.client_cert_file),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            signal,
            env,
        );
        let key = self.pick(
            path_setting("flows.otlp.client-key-file", &self.client_key_file),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            signal,
            env,
        );
        let client_identity = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((read_pem(&c, "CERTIFICATE")?, read_pem(&k, "PRIVATE KEY")?)),
            (Some(one), None) | (None, Some(one)) => {
                return Err(invalid(
                    one.from,
                    &one.value,
                    "a client certificate and its key go together: set both (client-cert-file and client-key-file)",
                ));
            }
        };
        let compression = match self.pick(
            self.compression.clone().map(|c| ("flows.otlp.compression", c)),
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            signal,
            env,
        ) {
            None => Compression::None,
            Some(f) => match f.value.trim() {
                "gzip" => Compression::Gzip,
                "none" | "" => Compression::None,
                other => return Err(invalid(f.from, other, "expected gzip or none")),
            },
        };
        let timeout = match self.pick(
            self.timeout_ms.map(|t| ("flows.otlp.timeout-ms", t.to_string())),
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            signal,
            env,
        ) {
            None => Duration::from_millis(DEFAULT_TIMEOUT_MS),
            Some(f) => match f.value.trim().parse::<u64>() {
                Ok(ms @ 1..=3_600_000) => Duration::from_millis(ms),
                _ => return Err(invalid(f.from, &f.value, "expected milliseconds, from 1 to 3600000")),
            },
        };
        Ok(Transport {
            signal,
            protocol,
            endpoint,
            headers: self.headers(signal, env)?,
            ca_pem,
            client_identity,
            compression,
            timeout,
        })
    }

    /// The signal's endpoint: for http/protobuf the whole URL (a base gets
    /// `/v1/logs` or `/v1/traces`), for grpc the collector's address with a
    /// scheme (`insecure` decides when none is given).
    fn endpoint(&self, signal: Signal, protocol: Protocol, env: &dyn Env) -> Result<String, OtlpError> {
        let (own, own_key) = match signal {
            Signal::Logs => (&self.logs_endpoint, "flows.otlp.logs-endpoint"),
            Signal::Traces => (&self.traces_endpoint, "flows.otlp.traces-endpoint"),
        };
        let specific = signal_var("OTEL_EXPORTER_OTLP_ENDPOINT", signal);
        // A signal's own endpoint is used as written; a general one is a base.
        let (found, as_written) = if let Some(e) = own {
            (Found { value: e.clone(), from: own_key }, true)
        } else if let Some(e) = &self.endpoint {
            (Found { value: e.clone(), from: "flows.otlp.endpoint" }, false)
        } else if let Some(e) = env.var(specific).filter(|v| !v.trim().is_empty()) {
            (Found { value: e, from: specific }, true)
        } else if let Some(e) = env.var("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty()) {
            (Found { value: e, from: "OTEL_EXPORTER_OTLP_ENDPOINT" }, false)
        } else {
            let default = match protocol {
                Protocol::Grpc => "http://127.0.0.1:4317",
                Protocol::HttpProtobuf => "http://127.0.0.1:4318",
            };
            (Found { value: default.into(), from: "flows.otlp.endpoint" }, false)
        };
        let value = found.value.trim();
        let has_scheme = value.starts_with("http://") || value.starts_with("https://");
        let url = match protocol {
            Protocol::HttpProtobuf if !has_scheme => {
                return Err(invalid(found.from, value, "OTLP/HTTP needs an http:// or https:// URL"));
            }
            Protocol::HttpProtobuf if as_written => value.to_owned(),
            Protocol::HttpProtobuf => format!("{}/{}", value.trim_end_matches('/'), signal.path()),
            Protocol::Grpc if has_scheme => value.to_owned(),
            Protocol::Grpc => {
                let insecure = match self.pick(
                    self.insecure.map(|i| ("flows.otlp.insecure", i.to_string())),
                    "OTEL_EXPORTER_OTLP_INSECURE",
                    signal,
                    env,
                ) {
                    None => false,
                    Some(f) => match f.value.trim().to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid(f.from, &f.value, "expected true or false")),
                    },
                };
                format!("{}://{value}", if insecure { "http" } else { "https" })
            }
        };
        match reqwest::Url::parse(&url) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(url),
            Ok(_) => Err(invalid(found.from, value, "no host in the URL")),
            Err(e) => Err(invalid(found.from, value, e)),
        }
    }

    /// The headers: the environment's (general, then the signal's), then the
    /// config's, then the header file's; a later one of the same name wins.
    fn headers(&self, signal: Signal, env: &dyn Env) -> Result<Vec<(String, String)>, OtlpError> {
        let mut all: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
        for var in ["OTEL_EXPORTER_OTLP_HEADERS", signal_var("OTEL_EXPORTER_OTLP_HEADERS", signal)] {
            if let Some(list) = env.var(var) {
                for (k, v) in parse_pairs(&list).map_err(|r| invalid(var, "(not shown)", r))? {
                    all.insert(k.to_ascii_lowercase(), (v, var));
                }
            }
        }
        for (k, v) in &self.headers {
            all.insert(k.to_ascii_lowercase(), (v.clone(), "flows.otlp.headers"));
        }
        if let Some(p) = &self.headers_file {
            let from = "flows.otlp.headers-file";
            let text = read_file(p).map_err(|r| invalid(from, p.display(), r))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((k, v)) = line.split_once(':') else {
                    return Err(invalid(
                        from,
                        p.display(),
                        format!("line {}: expected `Name: value` (the value is not shown)", n + 1),
                    ));
                };
                all.insert(k.trim().to_ascii_lowercase(), (v.trim().to_owned(), from));
            }
        }
        for (k, (v, from)) in &all {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() || k.starts_with(':') {
                return Err(invalid(from, k, "not a header name"));
            }
            if reqwest::header::HeaderValue::from_str(v).is_err() {
                return Err(invalid(from, k, "the value of this header is not a valid header value (not shown)"));
            }
        }
        Ok(all.into_iter().map(|(k, (v, _))| (k, v)).collect())
    }

    /// Resource attributes besides weft's own: `$OTEL_RESOURCE_ATTRIBUTES`,
    /// `$OTEL_SERVICE_NAME`, then the config's (these win).
    fn resource(&self, env: &dyn Env) -> Result<Vec<(String, String)>, OtlpError> {
        let mut all = BTreeMap::new();
        if let Some(list) = env.var("OTEL_RESOURCE_ATTRIBUTES") {
            all.extend(parse_pairs(&list).map_err(|r| invalid("OTEL_RESOURCE_ATTRIBUTES", &list, r))?);
        }
        if let Some(name) = env.var("OTEL_SERVICE_NAME").filter(|v| !v.trim().is_empty()) {
            all.insert("service.name".into(), name.trim().to_owned());
        }
        all.extend(self.resource_attributes.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all.into_iter().collect())
    }
}

/// `OTEL_EXPORTER_OTLP_X` -> `OTEL_EXPORTER_OTLP_LOGS_X` / `..._TRACES_X`.
fn signal_var(var: &'static str, signal: Signal) -> &'static str {
    const VARS: [(&str, &str, &str); 9] = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_LOGS_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        ),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_LOGS_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE"),
        (
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        ),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
    ];
    VARS.iter().find(|(general, ..)| *general == var).map_or(var, |(_, logs, traces)| match signal {
        Signal::Logs => logs,
        Signal::Traces => traces,
    })
}

/// What is wrong with one entry of a `key=value` list (entries count from 1).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("entry {entry}: expected key=value")]
    NotKeyValue { entry: usize },
    #[error("entry {entry}: an empty key")]
    EmptyKey { entry: usize },
    #[error("entry {entry} ({key}): a bad %-escape")]
    BadEscape { entry: usize, key: String },
}

/// `key1=value1,key2=value2` (W3C Baggage without properties, as the
/// OpenTelemetry specification has it for headers and resource attributes):
/// keys and values trimmed, values percent-decoded.
pub fn parse_pairs(list: &str) -> Result<Vec<(String, String)>, PairError> {
    let mut out = Vec::new();
    for (i, item) in list.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            return Err(PairError::NotKeyValue { entry: i + 1 });
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(PairError::EmptyKey { entry: i + 1 });
        }
        let v = percent_decode(v.trim()).ok_or_else(|| PairError::BadEscape { entry: i + 1, key: k.to_owned() })?;
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A bounded read of a small text file.
fn read_file(p: &Path) -> Result<String, FileError> {
    let f = std::fs::File::open(p)?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge);
    }
    Ok(text)
}

/// Why a small text file (headers, PEM) could not be read.
#[derive(Debug, thiserror::Error)]
enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("larger than {MAX_FILE_BYTES} bytes")]
    TooLarge,
}

/// A PEM file that holds at least one block of `label` (`CERTIFICATE`, or
/// any `... PRIVATE KEY`).
fn read_pem(f: &Found, label: &str) -> Result<Vec<u8>, OtlpError> {
    let text = read_file(Path::new(&f.value)).map_err(|r| invalid(f.from, &f.value, r))?;
    let has = text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !has {
        return Err(invalid(f.from, &f.value, format!("no PEM {label} block in the file")));
    }
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn opts(yaml: &str) -> OtlpOptions {
        serde_json::from_str(yaml).unwrap()
    }

    #[test]
    fn the_environment_configures_what_the_config_leaves_unset() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example/otlp/spans"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret, x-tenant = blue"),
            ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-tenant=green"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=ignored"),
            ("OTEL_SERVICE_NAME", "weft-east"),
        ]);
        let c = OtlpOptions::default().resolve(&e).unwrap();
        assert_eq!(c.logs.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.logs.endpoint, "https://collector:4318/v1/logs");
        assert_eq!(c.traces.endpoint, "https://traces.example/otlp/spans", "a signal's endpoint is used as written");
        assert_eq!(c.logs.headers, vec![("api-key".into(), "s=cret".into()), ("x-tenant".into(), "green".into())]);
        assert_eq!(c.traces.headers, vec![("api-key".into(), "s=cret".into()), ("x-tenant".into(), "blue".into())]);
        assert_eq!(c.logs.compression, Compression::Gzip);
        assert_eq!(c.traces.timeout, Duration::from_millis(2500));
        assert_eq!(
            c.resource,
            vec![("deployment.environment".into(), "prod".into()), ("service.name".into(), "weft-east".into())]
        );
        // A header's value never reaches Debug output.
        assert!(!format!("{c:?}").contains("s=cret"), "{c:?}");
    }

    #[test]
    fn the_config_wins_over_the_environment() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://from-env:4318"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "https://from-env:4318/logs"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=env"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
        ]);
        let o = opts(
            r#"{"endpoint": "http://from-config:4318", "protocol": "http/protobuf", "headers": {"X-Tenant": "config"},
                "compression": "none", "timeout-ms": 700, "resource-attributes": {"k8s.cluster.name": "c1"}}"#,
        );
        let c = o.resolve(&e).unwrap();
        assert_eq!(c.logs.endpoint, "http://from-config:4318/v1/logs");
        assert_eq!(c.traces.endpoint, "http://from-config:4318/v1/traces");
        assert_eq!(c.logs.headers, vec![("x-tenant".into(), "config".into())]);
        assert_eq!(c.logs.compression, Compression::None);
        assert_eq!(c.logs.timeout, Duration::from_millis(700));
        assert_eq!(c.resource, vec![("k8s.cluster.name".into(), "c1".into())]);
    }

    #[test]
    fn grpc_endpoints_without_a_scheme_use_tls_unless_insecure() {
        let none = env(&[]);
        let c = opts(r#"{"endpoint": "collector:4317"}"#).resolve(&none).unwrap();
        assert_eq!(c.logs.endpoint, "https://collector:4317");
        let c = opts(r#"{"endpoint": "collector:4317", "insecure": true}"#).resolve(&none).unwrap();
        assert_eq!(c.logs.endpoint, "http://collector:4317");
        let by_env = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"), ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE")]);
        assert_eq!(OtlpOptions::default().resolve(&by_env).unwrap().traces.endpoint, "http://collector:4317");
        let c = OtlpOptions::default().resolve(&none).unwrap();
        assert_eq!((c.logs.endpoint.as_str(), c.logs.protocol), ("http://127.0.0.1:4317", Protocol::Grpc));
        assert!(!enabled_by_env(&none) && enabled_by_env(&by_env));
    }

    #[test]
    fn bad_settings_are_refused_naming_where_they_came_from() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (r#"{"protocol": "http/json"}"#, &[], "flows.otlp.protocol = http/json"),
            ("{}", &[("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "thrift")], "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL = thrift"),
            (
                r#"{"protocol": "http/protobuf", "endpoint": "collector:4318"}"#,
                &[],
                "flows.otlp.endpoint = collector:4318",
            ),
            ("{}", &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")], "OTEL_EXPORTER_OTLP_COMPRESSION = zstd"),
            ("{}", &[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")], "OTEL_EXPORTER_OTLP_TIMEOUT = soon"),
            ("{}", &[("OTEL_EXPORTER_OTLP_INSECURE", "yes")], ""),
            (r#"{"headers": {"bad header": "x"}}"#, &[], "flows.otlp.headers = bad header: not a header name"),
            ("{}", &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")], "OTEL_EXPORTER_OTLP_HEADERS = (not shown): entry 1"),
            (r#"{"ca-file": "/nonexistent/ca.pem"}"#, &[], "flows.otlp.ca-file = /nonexistent/ca.pem: "),
            (
                r#"{"client-cert-file": "/etc/hostname"}"#,
                &[],
                "flows.otlp.client-cert-file = /etc/hostname: a client certificate and its key go together",
            ),
            (r#"{"queue-size": 0}"#, &[], "flows.otlp.queue-size = 0: must be from 1"),
            (r#"{"allow": [{"verdikt": ["DROPPED"]}]}"#, &[], "flows.otlp.allow = "),
            (
                "{}",
                &[("OTEL_RESOURCE_ATTRIBUTES", "a=%zz")],
                "OTEL_RESOURCE_ATTRIBUTES = a=%zz: entry 1 (a): a bad %-escape",
            ),
        ];
        for (yaml, vars, want) in cases {
            let got = opts(yaml).resolve(&env(vars));
            // INSECURE only matters for a grpc endpoint without a scheme.
            if want.is_empty() {
                assert!(got.is_ok(), "{yaml} {vars:?}: {got:?}");
                continue;
            }
            let msg = got.err().unwrap_or_else(|| panic!("{yaml} {vars:?} was accepted")).to_string();
            assert!(msg.starts_with(want), "{yaml} {vars:?}: {msg}");
        }
        // Secrets stay out of errors.
        let e = env(&[("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer\tsecret\u{7f}")]);
        let msg = OtlpOptions::default().resolve(&e).unwrap_err().to_string();
        assert!(!msg.contains("secret"), "{msg}");
    }

    #[test]
    fn a_header_file_holds_name_value_lines() {
        let dir = std::env::temp_dir().join(format!("weft-otlp-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("headers");
        std::fs::write(&p, "# from the Secret\nAuthorization: Bearer abc:def\n\nx-tenant: blue\n").unwrap();
        let o = OtlpOptions { headers_file: Some(p.clone()), ..opts(r#"{"headers": {"x-tenant": "red"}}"#) };
        let c = o.resolve(&env(&[])).unwrap();
        assert_eq!(
            c.logs.headers,
            vec![("authorization".into(), "Bearer abc:def".into()), ("x-tenant".into(), "blue".into())]
        );
        std::fs::write(&p, "Authorization Bearer abc\n").unwrap();
        let msg = o.resolve(&env(&[])).unwrap_err().to_string();
        assert!(msg.contains("line 1: expected `Name: value`") && !msg.contains("abc"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signal_variables_are_named_as_the_specification_names_them() {
        assert_eq!(signal_var("OTEL_EXPORTER_OTLP_CLIENT_KEY", Signal::Traces), "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY");
        assert_eq!(signal_var("OTEL_EXPORTER_OTLP_ENDPOINT", Signal::Logs), "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT");
    }
}
