fn main() {
    // refinery's embed_migrations! does not notice new files on its own.
    println!("cargo:rerun-if-changed=sql");
    println!("cargo:rerun-if-changed=web");
}
