//! meshlane-cni: the chained CNI plugin that registers each pod sandbox
//! with the meshlane agent before its containers run (see `cni/plugin.rs`).
fn main() -> std::process::ExitCode {
    meshlane::cni::plugin::main()
}
