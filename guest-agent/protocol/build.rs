//! Generates the protobuf messages and the async ttrpc service from `proto/agent.proto`.
//!
//! The generated files start with inner attributes (`#![allow(..)]`), which `include!`
//! does not accept; they are stripped here and the equivalent allows are put on the
//! including modules in `src/lib.rs`.
use std::path::Path;
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating ttrpc code from proto/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let l = line.trim_start();
                !l.starts_with("#![") && !l.starts_with("//!")
            })
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated file");
    }
}
