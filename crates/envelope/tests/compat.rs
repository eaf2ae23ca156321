//! The envelope's compatibility check (docs/envelope.md, "Versioning and
//! compatibility"): the current `proto/walcast/v1/envelope.proto`, compiled,
//! against the released descriptor set `proto/released/walcast.v1.binpb`.
//!
//! Fails on a removed message or field, a changed field number, name, type,
//! label, oneof or JSON name, a field that takes a number or name the release
//! reserved, and a dropped reservation. Added fields and messages pass.
//!
//! At a release, record the new descriptor set with
//! `WALCAST_RELEASE_ENVELOPE=1 cargo test -p walcast-envelope --test compat`
//! (it is written only when the check passes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const RELEASED: &str = "proto/released/walcast.v1.binpb";

fn compile(include: &Path, file: &str) -> FileDescriptorSet {
    let mut compiler = protox::Compiler::new([include]).unwrap();
    compiler.include_source_info(false);
    compiler.include_imports(true);
    compiler.open_file(file).unwrap();
    compiler.file_descriptor_set()
}

fn current() -> FileDescriptorSet {
    compile(&repo().join("proto"), "walcast/v1/envelope.proto")
}

/// Every message of a descriptor set by its full name (nested ones too).
fn messages(set: &FileDescriptorSet) -> BTreeMap<String, &DescriptorProto> {
    fn walk<'a>(
        prefix: &str,
        m: &'a DescriptorProto,
        out: &mut BTreeMap<String, &'a DescriptorProto>,
    ) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk(&name, nested, out);
        }
        out.insert(name, m);
    }
    let mut out = BTreeMap::new();
    for f in &set.file {
        for m in &f.message_type {
            walk(f.package(), m, &mut out);
        }
    }
    out
}

fn reserved_number(m: &DescriptorProto, n: i32) -> bool {
    // DescriptorProto.ReservedRange: start inclusive, end exclusive
    m.reserved_range
        .iter()
        .any(|r| r.start() <= n && n < r.end())
}

fn oneof_name(m: &DescriptorProto, f: &FieldDescriptorProto) -> Option<String> {
    f.oneof_index
        .and_then(|i| m.oneof_decl.get(i as usize))
        .map(|o| o.name().to_string())
}

/// The rule violations of `current` against `released`; empty when compatible.
fn violations(released: &FileDescriptorSet, current: &FileDescriptorSet) -> Vec<String> {
    let mut v = Vec::new();
    let cur = messages(current);
    for (name, old) in messages(released) {
        let Some(new) = cur.get(&name) else {
            v.push(format!(
                "message {name} was removed (or its package renamed)"
            ));
            continue;
        };
        for of in &old.field {
            let what = format!("{name}.{} (number {})", of.name(), of.number());
            let by_number = new.field.iter().find(|f| f.number() == of.number());
            let by_name = new.field.iter().find(|f| f.name() == of.name());
            match (by_number, by_name) {
                (None, None) => v.push(format!("field {what} was removed")),
                (None, Some(f)) => v.push(format!("field {what} was renumbered to {}", f.number())),
                (Some(f), _) if f.name() != of.name() => v.push(format!(
                    "field {what} was renamed to `{}` (names are part of the JSON form)",
                    f.name()
                )),
                (Some(f), _) => {
                    if f.r#type() != of.r#type() || f.type_name() != of.type_name() {
                        v.push(format!(
                            "field {what} changed type from {:?} {} to {:?} {}",
                            of.r#type(),
                            of.type_name(),
                            f.r#type(),
                            f.type_name()
                        ));
                    }
                    if f.label() != of.label() || f.proto3_optional() != of.proto3_optional() {
                        v.push(format!(
                            "field {what} changed label from {:?}{} to {:?}{}",
                            of.label(),
                            if of.proto3_optional() {
                                " (optional)"
                            } else {
                                ""
                            },
                            f.label(),
                            if f.proto3_optional() {
                                " (optional)"
                            } else {
                                ""
                            },
                        ));
                    }
                    if oneof_name(new, f) != oneof_name(old, of) && !of.proto3_optional() {
                        v.push(format!("field {what} moved into or out of a oneof"));
                    }
                    if f.json_name() != of.json_name() {
                        v.push(format!(
                            "field {what} changed its JSON name from {} to {}",
                            of.json_name(),
                            f.json_name()
                        ));
                    }
                }
            }
        }
        for r in &old.reserved_range {
            for n in [r.start(), r.end() - 1] {
                if !reserved_number(new, n) {
                    v.push(format!(
                        "message {name}: the reservation of number {n} was dropped (reserved numbers stay reserved)"
                    ));
                }
            }
        }
        for rn in &old.reserved_name {
            if !new.reserved_name.contains(rn) {
                v.push(format!(
                    "message {name}: the reserved name `{rn}` was dropped"
                ));
            }
        }
        for f in &new.field {
            if old.field.iter().any(|of| of.number() == f.number()) {
                continue;
            }
            if reserved_number(old, f.number()) {
                v.push(format!(
                    "field {name}.{} uses number {}, which the release reserved (never reuse a number)",
                    f.name(),
                    f.number()
                ));
            }
            if old.reserved_name.iter().any(|n| n == f.name()) {
                v.push(format!(
                    "field {name}.{} reuses a name the release reserved",
                    f.name()
                ));
            }
        }
    }
    v
}

fn released() -> FileDescriptorSet {
    let path = repo().join(RELEASED);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    FileDescriptorSet::decode(bytes.as_slice()).unwrap()
}

#[test]
fn current_proto_keeps_the_compatibility_rules_of_the_release() {
    let (released, current) = (released(), current());
    let v = violations(&released, &current);
    assert!(
        v.is_empty(),
        "proto/walcast/v1/envelope.proto breaks the compatibility rules of walcast.v1 \
         (docs/envelope.md): add fields only, never remove, rename or renumber one, never \
         change a type or label, never use a reserved number. A breaking change is a new \
         package (walcast.v2).\n  - {}",
        v.join("\n  - ")
    );
    if std::env::var_os("WALCAST_RELEASE_ENVELOPE").is_some_and(|x| x == "1") {
        std::fs::write(repo().join(RELEASED), current.encode_to_vec()).unwrap();
    }
}

/// The check itself, on edited copies of the proto: each kind of breaking
/// edit is caught, adding a field is not.
mod rules {
    use super::*;

    fn edited(from: &str, to: &str) -> Vec<String> {
        let text = std::fs::read_to_string(repo().join("proto/walcast/v1/envelope.proto")).unwrap();
        assert!(text.contains(from), "the proto no longer contains {from:?}");
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "walcast-envelope-compat-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("walcast/v1")).unwrap();
        std::fs::write(
            dir.join("walcast/v1/envelope.proto"),
            text.replacen(from, to, 1),
        )
        .unwrap();
        let set = compile(&dir, "walcast/v1/envelope.proto");
        let _ = std::fs::remove_dir_all(&dir);
        violations(&released(), &set)
    }

    fn fails(from: &str, to: &str, expect: &str) {
        let v = edited(from, to);
        assert!(
            v.iter().any(|m| m.contains(expect)),
            "expected {expect:?} in {v:#?}"
        );
    }

    #[test]
    fn adding_a_field_passes() {
        assert_eq!(
            edited(
                "string schema_version = 13;",
                "string schema_version = 13;\n  string tenant = 14;"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn removing_a_field_fails() {
        fails(
            "  string correlation_id = 10;\n",
            "",
            "walcast.v1.Envelope.correlation_id (number 10) was removed",
        );
    }

    #[test]
    fn renumbering_a_field_fails() {
        fails(
            "string event_type = 4;",
            "string event_type = 14;",
            "was renumbered to 14",
        );
    }

    #[test]
    fn renaming_a_field_fails() {
        fails(
            "string aggregate_id = 3;",
            "string aggregate_key = 3;",
            "was renamed to `aggregate_key`",
        );
    }

    #[test]
    fn changing_a_type_fails() {
        fails(
            "int64 timestamp_unix_micros = 5;",
            "uint64 timestamp_unix_micros = 5;",
            "changed type",
        );
    }

    #[test]
    fn changing_a_label_fails() {
        fails(
            "string traceparent = 11;",
            "repeated string traceparent = 11;",
            "changed label",
        );
        fails(
            "string traceparent = 11;",
            "optional string traceparent = 11;",
            "changed label",
        );
    }

    #[test]
    fn using_a_reserved_number_fails() {
        fails(
            "reserved 15;",
            "string tenant = 15;",
            "uses number 15, which the release reserved",
        );
    }

    #[test]
    fn dropping_a_reservation_fails() {
        fails(
            "reserved 15;",
            "",
            "the reservation of number 15 was dropped",
        );
    }

    #[test]
    fn renaming_the_package_fails() {
        fails(
            "package walcast.v1;",
            "package walcast.v2;",
            "message walcast.v1.Envelope was removed",
        );
    }

    #[test]
    fn removing_a_message_field_of_a_nested_type_fails() {
        fails(
            "  uint32 xid = 2;\n",
            "",
            "walcast.v1.SourcePosition.xid (number 2) was removed",
        );
    }
}
