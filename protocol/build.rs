//! Generates the agent's ttrpc service and protobuf messages from protos/agent.proto.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("gen");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/gen");
    println!("cargo:rerun-if-changed=protos/agent.proto");
    Codegen::new()
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generating the agent protocol from protos/agent.proto");
    // `include!` cannot take files with inner attributes: strip them.
    for entry in std::fs::read_dir(&out).expect("read OUT_DIR/gen") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("write generated file");
    }
}
