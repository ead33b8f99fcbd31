//! Writes the seed inputs (`plugbus_fuzz::seeds`) to `fuzz/corpus/<target>/seed-<n>`.
fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in plugbus_fuzz::seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write a seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
