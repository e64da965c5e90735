//! meshlane: eBPF interception for service-mesh sidecars, a drop-in for
//! Istio's iptables init container. The binary is the library's command line.
fn main() -> std::process::ExitCode {
    meshlane::cli::main()
}
