//! meshlane-cni: the chained CNI plugin that registers each pod sandbox
//! with the meshlane agent before its containers run (see `cni/plugin.rs`).
//! Without CNI_COMMAND it is the installer (`install`, `uninstall`; see
//! `cni/install.rs`).
fn main() -> std::process::ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        meshlane::cni::plugin::main()
    } else {
        meshlane::cni::install::main()
    }
}
