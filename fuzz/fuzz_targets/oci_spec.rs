//! The OCI runtime spec translation (the bundle's config.json and annotations, input a
//! containerd client controls): `to_guest`, `pod_network`, `host_cgroup` and VM sizing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else {
        return;
    };
    let Ok(ann) = vmbox_oci::Annotations::parse(spec.annotations().as_ref()) else {
        return;
    };
    let _ = vmbox_oci::pod_network(&spec);
    let _ = vmbox_oci::cgroup::host_cgroup(&spec);
    let vm = vmbox_config::VmConfig::default();
    let size = vmbox_oci::sizing::vm_size(&spec, &ann, &vm, vmbox_oci::sizing::Host { cpus: 2, memory_mib: 24 * 1024 });
    assert!(size.vcpus >= 1 && size.memory_mib >= vmbox_config::MIN_MEMORY_MIB, "{size:?}");
    if let Ok(g) = vmbox_oci::to_guest(&spec, "fuzz", &ann) {
        // The guest gets JSON it can parse back.
        let bytes = serde_json::to_vec(&g.spec).expect("encodes");
        let _: oci_spec::runtime::Spec = serde_json::from_slice(&bytes).expect("round trip");
    }
});
