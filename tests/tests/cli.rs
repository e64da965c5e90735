//! `meshlane iptables`: Istio's rules for a pod from a pods file, compared
//! with the golden rules Istio's CNI plugin writes for the same pod.
use std::process::Command;

use anyhow::Result;
use meshlane_tests::{agent::pod_list, data_dir, meshlane_bin, PodSpec};

#[test]
fn iptables_command_prints_istios_rules_for_a_pod() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("meshlane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut custom = PodSpec {
        name: "custom".into(),
        meshed: true,
        ..Default::default()
    };
    custom.run_as_user = Some(1_000_670_000);
    custom.run_as_group = Some(1_000_670_001);
    let plain = PodSpec {
        name: "plain".into(),
        ..Default::default()
    };
    let file = dir.join("pods.json");
    std::fs::write(&file, pod_list(&[custom, plain]))?;
    let run = |pod: &str| {
        Command::new(meshlane_bin())
            .arg("iptables")
            .arg("--pods")
            .arg(&file)
            .args(["--pod", pod])
            .output()
    };

    let out = run("default/custom")?;
    let golden = std::fs::read_to_string(data_dir().join("istio-cni/custom-uid.rules"))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?, golden);

    let out = run("plain")?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not meshed"));
    let out = run("missing")?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod \"missing\""));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
