#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use outrigger::config::{Config, LoadError, parse_duration};
use outrigger::run::{self, Options};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Outrigger: a sidecar service-mesh proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Exit when stdin closes: the demo's children end with the demo even
    /// when it is killed outright.
    #[arg(long, global = true, hide = true)]
    exit_with_stdin: bool,
}

#[derive(clap::Args)]
struct Common {
    /// Worker threads (default: the CPUs this container may use).
    #[arg(long, env = "OUTRIGGER_THREADS")]
    threads: Option<usize>,
    /// Log level when RUST_LOG is unset (trace, debug, info, warn, error,
    /// off, or per-target directives such as `info,outrigger::proxy=debug`;
    /// release builds compile trace-level events out, so trace shows what
    /// debug shows).
    #[arg(long, env = "OUTRIGGER_LOG_LEVEL", default_value = "info", value_parser = outrigger::telemetry::check_log_level)]
    log_level: String,
    /// Longest wait for in-flight requests on shutdown.
    #[arg(long, env = "OUTRIGGER_DRAIN_TIMEOUT", default_value = "30s", value_parser = dur)]
    drain_timeout: Duration,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Cmd {
    /// Run the proxy (sidecar or gateway) on a config file.
    Run {
        #[arg(
            long,
            env = "OUTRIGGER_CONFIG",
            required_unless_present = "config_yaml"
        )]
        config: Option<PathBuf>,
        /// The config itself instead of a file (what an injected sidecar
        /// gets: its bootstrap, filled in by the kubelet); not watched.
        #[arg(
            long,
            env = "OUTRIGGER_CONFIG_YAML",
            conflicts_with = "config",
            hide_env_values = true
        )]
        config_yaml: Option<String>,
        /// How often the config file is checked for changes.
        #[arg(long, env = "OUTRIGGER_WATCH_INTERVAL", default_value = "1s", value_parser = dur)]
        watch_interval: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// Check a config file; print every error and warning with its field
    /// path and line (exit 1 on any error).
    Validate { file: PathBuf },
    /// Check a running proxy from its admin port: ready, listeners bound,
    /// clusters with a healthy endpoint, refused updates, certificate
    /// expiry (exit 1 if a check fails).
    Check {
        /// The proxy's admin address.
        #[arg(long, env = "OUTRIGGER_ADMIN", default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// Wait until the proxy's `/ready` answers 200 (a classic sidecar's
    /// postStart hook: the app starts after the proxy is ready).
    WaitReady {
        /// The proxy's probe address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        probes: String,
        #[arg(long, default_value = "120s", value_parser = dur)]
        timeout: std::time::Duration,
        /// On timeout, warn and exit 0: a failed postStart hook gets the
        /// proxy container killed, which helps nobody (readiness already
        /// says the proxy is not ready).
        #[arg(long)]
        continue_on_timeout: bool,
    },
    /// Start a small local mesh on loopback to try Outrigger out.
    Demo {
        #[command(flatten)]
        common: Common,
    },
    /// The control plane: the mesh model from a directory of YAML or the
    /// Kubernetes API, streamed to every proxy; the mesh CA.
    ControlPlane {
        /// A directory of mesh documents (Services, EndpointSlices,
        /// HTTPRoutes, GRPCRoutes, TrafficPolicies, AuthorizationPolicies).
        #[arg(long, env = "OUTRIGGER_MESH_DIR")]
        mesh_dir: Option<PathBuf>,
        /// Watch the Kubernetes API instead (in-cluster or kubeconfig).
        #[arg(long, env = "OUTRIGGER_KUBERNETES")]
        kubernetes: bool,
        #[arg(long, env = "OUTRIGGER_LISTEN", default_value = "0.0.0.0:15010")]
        listen: std::net::SocketAddr,
        /// The mesh CA (`outrigger ca init DIR`), shared by replicas.
        #[arg(long, env = "OUTRIGGER_CA_DIR", required_unless_present = "print_crds")]
        ca_dir: Option<PathBuf>,
        /// Bootstrap tokens: a YAML list of { token, identity }.
        #[arg(long, env = "OUTRIGGER_TOKENS")]
        tokens: Option<PathBuf>,
        #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        #[arg(
            long,
            env = "OUTRIGGER_CLUSTER_DOMAIN",
            default_value = "cluster.local"
        )]
        cluster_domain: String,
        /// The control plane's own namespace (its identity).
        #[arg(long, env = "OUTRIGGER_NAMESPACE", default_value = "outrigger")]
        namespace: String,
        /// DNS names for the control plane's certificate.
        #[arg(long, env = "OUTRIGGER_DNS")]
        dns: Vec<String>,
        /// Lifetime of the certificates the CA issues.
        #[arg(long, env = "OUTRIGGER_CERT_TTL", default_value = "24h", value_parser = dur)]
        cert_ttl: Duration,
        /// How long a gone proxy stays an endpoint (a reconnect, a blip).
        #[arg(long, env = "OUTRIGGER_GRACE", default_value = "5s", value_parser = dur)]
        grace: Duration,
        /// Keep the proxies' registrations here, so that a restart pushes
        /// the endpoints it had instead of waiting for every proxy. One
        /// directory per replica, never shared.
        #[arg(long, env = "OUTRIGGER_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// How long a registration taken back at start waits for its
        /// proxy: the proxies' longest reconnect backoff (30 s), one
        /// attempt's connect and TLS timeouts (5 s each) and a margin.
        #[arg(long, env = "OUTRIGGER_REREGISTER_WINDOW", default_value = "45s", value_parser = dur)]
        reregister_window: Duration,
        /// Render plaintext meshes (no mTLS between sidecars).
        #[arg(long, env = "OUTRIGGER_NO_MTLS")]
        no_mtls: bool,
        #[arg(long, env = "OUTRIGGER_WATCH_INTERVAL", default_value = "1s", value_parser = dur)]
        watch_interval: Duration,
        /// Print the CustomResourceDefinitions of the own kinds and exit.
        #[arg(long)]
        print_crds: bool,
        /// Serve the injection webhook (`POST /inject`) here, over HTTPS
        /// with --webhook-cert and --webhook-key.
        #[arg(long, env = "OUTRIGGER_WEBHOOK_LISTEN", requires_all = ["webhook_cert", "webhook_key"])]
        webhook_listen: Option<std::net::SocketAddr>,
        #[arg(long, env = "OUTRIGGER_WEBHOOK_CERT")]
        webhook_cert: Option<PathBuf>,
        #[arg(long, env = "OUTRIGGER_WEBHOOK_KEY")]
        webhook_key: Option<PathBuf>,
        /// Injection settings for the webhook (the chart's `inject.yaml`).
        #[arg(long, env = "OUTRIGGER_INJECT_CONFIG")]
        inject_config: Option<PathBuf>,
        #[arg(long, env = "OUTRIGGER_LOG_LEVEL", default_value = "info", value_parser = outrigger::telemetry::check_log_level)]
        log_level: String,
    },
    /// Add the sidecar to Kubernetes YAML (Pods, Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets, Jobs, CronJobs, Lists): reads FILE or stdin,
    /// writes the result to stdout; other documents pass unchanged.
    Inject {
        /// The YAML to inject (`-` or absent: stdin).
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Injection settings (image, control plane, CA, resources, ports):
        /// the chart's `inject.yaml`.
        #[arg(long, env = "OUTRIGGER_INJECT_CONFIG")]
        inject_config: Option<PathBuf>,
        /// A classic sidecar (first container) instead of a native one
        /// (Kubernetes before 1.29).
        #[arg(long)]
        classic: bool,
    },
    /// Install the pod's redirect rules (an init container with NET_ADMIN):
    /// outbound TCP to the outbound port, inbound TCP to the inbound port,
    /// the proxy's own UID, loopback and the excluded ports and CIDRs left
    /// alone; IPv4 and IPv6, iptables with the nftables backend.
    Init {
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// 0: inbound traffic is not redirected.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        #[arg(long, value_delimiter = ',')]
        exclude_inbound_ports: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// Address blocks the app reaches directly (e.g. 169.254.169.254/32).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_cidrs: Vec<String>,
        /// Take the rules out again.
        #[arg(long)]
        remove: bool,
        /// Print the rules (iptables-restore input) instead of installing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Live traffic figures (rate, success, p50, p99): per service and
    /// route of the mesh from a control plane's `/v1/mesh`, or per route of
    /// one proxy from its admin port.
    Stat {
        /// The control plane, `https://HOST:PORT`.
        #[arg(
            long,
            env = "OUTRIGGER_CONTROL_PLANE",
            required_unless_present = "admin",
            conflicts_with = "admin",
            requires_all = ["token_file", "ca"]
        )]
        control_plane: Option<String>,
        /// A bearer token the control plane knows (its --tokens file, or a
        /// ServiceAccount token with audience `outrigger`).
        #[arg(long, env = "OUTRIGGER_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The mesh CA's certificate (ca.pem): what the control plane's
        /// certificate chains to.
        #[arg(long, env = "OUTRIGGER_CA")]
        ca: Option<PathBuf>,
        #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// The identity the control plane presents (default
        /// spiffe://<trust domain>/ns/outrigger/sa/control-plane).
        #[arg(long)]
        control_plane_identity: Option<String>,
        /// One proxy's admin address instead (`127.0.0.1:15000`): figures
        /// from two scrapes of its /metrics 1 s apart.
        #[arg(long)]
        admin: Option<String>,
        /// Redraw every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Live requests of one proxy from its admin port's `/tap`, one line
    /// each as it is answered: time of arrival (UTC), listener, method,
    /// authority, path, status, latency, upstream, route, peer identity,
    /// trace id. Exit 0 at the end of the window or at --max.
    Tap {
        /// The proxy's admin address.
        #[arg(long, env = "OUTRIGGER_ADMIN", default_value = "127.0.0.1:15000")]
        admin: String,
        /// How long to watch.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Stop once this many requests were shown.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        max: u64,
        /// Print the events as the JSON lines the admin port sends.
        #[arg(long)]
        json: bool,
        /// Only requests of this route (its name in the config).
        #[arg(long)]
        route: Option<String>,
        /// Only requests answered with this status or above (e.g. 500).
        #[arg(long, value_parser = clap::value_parser!(u16).range(100..=999))]
        status_min: Option<u16>,
    },
    /// A developer CA for local mTLS: `ca init DIR`, `ca issue --spiffe ID`.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA in DIR (ca.pem, ca-key.pem).
    Init {
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a workload certificate with a SPIFFE ID: cert.pem, key.pem
    /// and roots.pem in --out.
    Issue {
        /// The workload's SPIFFE ID (spiffe://<trust domain>/ns/<ns>/sa/<sa>).
        #[arg(long)]
        spiffe: String,
        /// The CA's directory (from `ca init`).
        #[arg(long, default_value = "outrigger-ca")]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the certificate.
        #[arg(long, default_value = "24h", value_parser = dur)]
        valid: Duration,
        /// DNS names to add (for gateway hosts).
        #[arg(long)]
        dns: Vec<String>,
    },
}

/// `outrigger inject`: all or nothing; on any error exit 1 and write
/// nothing.
fn inject(file: Option<PathBuf>, settings: Option<PathBuf>, classic: bool) -> ExitCode {
    use std::io::{Read, Write};
    let mut s = match outrigger::inject::Settings::load(settings.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if classic {
        s.native = false;
    }
    let (name, text) = match file.filter(|f| f.as_os_str() != "-") {
        Some(f) => match std::fs::read_to_string(&f) {
            Ok(t) => (f.display().to_string(), t),
            Err(e) => {
                eprintln!("error: {}: {e}", f.display());
                return ExitCode::from(1);
            }
        },
        None => {
            let mut t = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut t) {
                eprintln!("error: stdin: {e}");
                return ExitCode::from(1);
            }
            ("stdin".to_string(), t)
        }
    };
    match outrigger::inject::inject_yaml(&text, &s) {
        Ok(out) => {
            let _ = std::io::stdout().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {name}: {e}");
            ExitCode::from(1)
        }
    }
}

fn dur(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.exit_with_stdin {
        std::thread::spawn(|| {
            use std::io::Read;
            let mut buf = [0u8; 64];
            while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    match cli.cmd {
        Cmd::Validate { file } => validate(&file),
        Cmd::WaitReady {
            probes,
            timeout,
            continue_on_timeout,
        } => match outrigger::check::wait_ready(&probes, timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if continue_on_timeout => {
                eprintln!("warning: {e}; going on");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Check { admin } => {
            if outrigger::check::run(&admin) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Tap {
            admin,
            seconds,
            max,
            json,
            route,
            status_min,
        } => {
            let opts = outrigger::tap_cli::Options {
                admin,
                seconds,
                max,
                json,
                filter: outrigger::tap_cli::Filter { route, status_min },
            };
            match outrigger::tap_cli::run(&opts) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Run {
            config,
            config_yaml,
            watch_interval,
            common,
        } => {
            outrigger::telemetry::init_logs(&common.log_level);
            let opts = Options {
                threads: common.threads.unwrap_or_else(run::default_threads),
                drain_timeout: common.drain_timeout,
                watch_interval,
            };
            let config = match (config, config_yaml) {
                (Some(c), _) => c,
                (None, Some(text)) => {
                    let from = PathBuf::from("$OUTRIGGER_CONFIG_YAML");
                    return match Config::load_text(&text) {
                        Ok(c) => block_on(&opts, run::serve(c, None, &opts)),
                        Err(e) => {
                            report(&from, &LoadError::Invalid(e));
                            ExitCode::from(1)
                        }
                    };
                }
                (None, None) => {
                    eprintln!("error: --config FILE or OUTRIGGER_CONFIG_YAML");
                    return ExitCode::from(2);
                }
            };
            let bytes = match std::fs::read(&config) {
                Ok(b) => b,
                Err(source) => {
                    report(
                        &config,
                        &LoadError::Read {
                            path: config.display().to_string(),
                            source,
                        },
                    );
                    return ExitCode::from(1);
                }
            };
            let parsed = match Config::load_text(&String::from_utf8_lossy(&bytes)) {
                Ok(c) => c,
                Err(e) => {
                    report(&config, &LoadError::Invalid(e));
                    return ExitCode::from(1);
                }
            };
            block_on(&opts, run::serve(parsed, Some((config, bytes)), &opts))
        }
        Cmd::Ca { cmd } => ca(cmd),
        Cmd::Stat {
            control_plane,
            token_file,
            ca,
            trust_domain,
            control_plane_identity,
            admin,
            watch,
        } => {
            let opts = Options {
                threads: 1,
                drain_timeout: Duration::from_secs(1),
                watch_interval: Duration::from_secs(1),
            };
            block_on(
                &opts,
                outrigger::control_plane::stat::run(outrigger::control_plane::stat::Options {
                    control_plane,
                    token_file,
                    ca,
                    trust_domain,
                    control_plane_identity,
                    admin,
                    watch,
                }),
            )
        }
        Cmd::Init {
            proxy_uid,
            outbound_port,
            inbound_port,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
            remove,
            dry_run,
        } => {
            use outrigger::intercept::rules;
            let cidrs: Result<Vec<_>, _> = exclude_outbound_cidrs
                .iter()
                .map(|c| rules::parse_cidr(c))
                .collect();
            let r = cidrs.map(|exclude_outbound_cidrs| rules::Rules {
                proxy_uid,
                outbound_port,
                inbound_port,
                exclude_inbound_ports,
                exclude_outbound_ports,
                exclude_outbound_cidrs,
            });
            let done = match (r, remove, dry_run) {
                (Err(e), ..) => Err(e),
                (Ok(r), false, true) => {
                    print!(
                        "# IPv4\n{}# IPv6\n{}",
                        r.install_script(rules::Family::V4),
                        r.install_script(rules::Family::V6)
                    );
                    Ok(())
                }
                (Ok(_), true, _) => rules::remove(),
                (Ok(r), false, false) => rules::install(&r),
            };
            match done {
                Ok(()) => {
                    if !dry_run {
                        eprintln!(
                            "outrigger init: redirect rules {}",
                            if remove { "removed" } else { "installed" }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Inject {
            file,
            inject_config,
            classic,
        } => inject(file, inject_config, classic),
        Cmd::ControlPlane {
            mesh_dir,
            kubernetes,
            listen,
            ca_dir,
            tokens,
            trust_domain,
            cluster_domain,
            namespace,
            dns,
            cert_ttl,
            grace,
            state_dir,
            reregister_window,
            no_mtls,
            watch_interval,
            print_crds,
            webhook_listen,
            webhook_cert,
            webhook_key,
            inject_config,
            log_level,
        } => {
            if print_crds {
                print!("{}", outrigger::control_plane::kinds::crds_yaml());
                return ExitCode::SUCCESS;
            }
            let Some(ca_dir) = ca_dir else {
                eprintln!("error: --ca-dir is required");
                return ExitCode::from(2);
            };
            outrigger::telemetry::init_logs(&log_level);
            let opts = Options {
                threads: run::default_threads(),
                drain_timeout: Duration::from_secs(1),
                watch_interval,
            };
            block_on(
                &opts,
                outrigger::control_plane::run(outrigger::control_plane::Options {
                    listen,
                    mesh_dir,
                    kubernetes,
                    ca_dir,
                    tokens,
                    trust_domain,
                    cluster_domain,
                    namespace,
                    dns,
                    cert_ttl,
                    grace,
                    state_dir,
                    reregister_window,
                    mtls: !no_mtls,
                    watch_interval,
                    webhook: webhook_listen.map(|listen| outrigger::control_plane::Webhook {
                        listen,
                        cert: webhook_cert.unwrap_or_default(),
                        key: webhook_key.unwrap_or_default(),
                        inject_config: inject_config.clone(),
                    }),
                }),
            )
        }
        Cmd::Demo { common } => {
            outrigger::telemetry::init_logs(&common.log_level);
            let opts = Options {
                threads: common.threads.unwrap_or_else(run::default_threads),
                drain_timeout: common.drain_timeout,
                watch_interval: Duration::from_secs(1),
            };
            block_on(&opts, outrigger::demo::run(&opts, &common.log_level))
        }
    }
}

fn block_on<E: std::fmt::Display>(
    opts: &Options,
    fut: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let rt = match run::runtime(opts.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrigger: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrigger: {e}");
            tracing::error!(error = %e, "exiting");
            ExitCode::from(1)
        }
    }
}

fn ca(cmd: CaCmd) -> ExitCode {
    use outrigger::tls::{ca, spiffe::SpiffeId};
    let result = match cmd {
        CaCmd::Init { dir, trust_domain } => ca::init(&dir, &trust_domain)
            .map(|p| println!("CA for {trust_domain} in {} (key beside it)", p.display())),
        CaCmd::Issue {
            spiffe,
            ca: dir,
            out,
            valid,
            dns,
        } => match SpiffeId::parse(&spiffe) {
            Err(e) => {
                eprintln!("--spiffe: {e}");
                return ExitCode::from(1);
            }
            Ok(id) => ca::issue_to(&dir, &id, &out, valid, &dns)
                .map(|()| println!("{id}: {}/cert.pem, key.pem, roots.pem", out.display())),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrigger ca: {e}");
            ExitCode::from(1)
        }
    }
}

/// `outrigger validate`: every error and warning, each with its path and
/// line; exit 1 on any error, 0 when there are only warnings.
fn validate(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(source) => {
            let path = file.display().to_string();
            report(file, &LoadError::Read { path, source });
            return ExitCode::from(1);
        }
    };
    let checked = Config::check_yaml(&text);
    let name = file.display();
    let warnings = checked.warnings.len();
    match &checked.config {
        Some(c) => println!(
            "{name}: ok ({} listeners, {} routes, {} clusters){}",
            c.listeners.len(),
            c.routes.len(),
            c.clusters.len(),
            match warnings {
                0 => String::new(),
                n => format!(", {n} warning(s)"),
            }
        ),
        None => eprintln!(
            "{name}: {} error(s){}",
            checked.errors.len(),
            match warnings {
                0 => String::new(),
                n => format!(", {n} warning(s)"),
            }
        ),
    }
    for e in &checked.errors {
        eprintln!("  error: {e}");
    }
    for w in &checked.warnings {
        eprintln!("  warning: {w}");
    }
    if checked.config.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn report(file: &std::path::Path, e: &LoadError) {
    match e {
        LoadError::Invalid(errs) => {
            eprintln!("{}: {} error(s)", file.display(), errs.0.len());
            for err in &errs.0 {
                eprintln!("  {err}");
            }
        }
        other => eprintln!("{other}"),
    }
}
