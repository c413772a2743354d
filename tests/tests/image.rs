//! weft's image (deploy/build-image.sh): an OCI archive whose index names
//! the image deploy/agent.yaml runs, holding every entry of
//! deploy/image-contents with the libraries its binaries load — shown by
//! running each binary chrooted into the unpacked layer. And
//! deploy/Containerfile, for users with a container engine, holds the same.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (kind, source, destination) of deploy/image-contents.
fn contents() -> Vec<(String, String, String)> {
    fs::read_to_string(repo().join("deploy/image-contents"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "KIND SOURCE DESTINATION: {l}");
            (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
        })
        .collect()
}

/// The image deploy/agent.yaml runs, as containerd names it.
fn agent_image() -> String {
    let text = fs::read_to_string(repo().join("deploy/agent.yaml")).unwrap();
    let images: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.trim().strip_prefix("image: ")).map(str::trim).collect();
    assert_eq!(images.len(), 1, "{images:?}");
    format!("docker.io/library/{}", images.first().unwrap())
}

#[test]
fn the_containerfile_holds_what_image_contents_lists() {
    let file = fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let text = file.replace("\\\n", " ");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let line_with = |words: &[&str]| lines.iter().any(|l| words.iter().all(|w| l.contains(w)));
    for (kind, src, dest) in contents() {
        match kind.as_str() {
            "cargo" => {
                let dir = Path::new(&dest).parent().unwrap().to_str().unwrap();
                assert!(line_with(&["cargo build", "--release"]), "the Containerfile builds release binaries");
                assert!(
                    line_with(&[&format!("target/release/{src}"), &format!("/out/{src}")]),
                    "{src} is installed from the build"
                );
                assert!(line_with(&["COPY --from=build", &format!("/out/{src}"), dir]), "{src} is copied to {dir}");
            }
            "envoy" => assert!(line_with(&["COPY --from=envoy", &dest]), "Envoy at {dest}"),
            "debian" => assert!(line_with(&["apt-get install", &src]), "Debian package {src}"),
            other => panic!("unknown kind {other}"),
        }
    }
    let cargo: Vec<String> = contents().into_iter().filter(|c| c.0 == "cargo").map(|c| c.1).collect();
    let copied = lines.iter().filter(|l| l.starts_with("COPY --from=build")).flat_map(|l| l.split_whitespace());
    for word in copied.filter_map(|w| w.strip_prefix("/out/")) {
        assert!(cargo.iter().any(|c| c == word), "the Containerfile copies {word}, which image-contents does not list");
    }
    assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/weft-agent\"]"));
}

fn skip_reason() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the image's files are root's; chroot)".into());
    }
    if Command::new("umoci").arg("--version").output().is_err() {
        return Some("needs umoci (Debian package umoci) to build the image".into());
    }
    None
}

/// A folder removed on drop.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The image's PATH (chroot itself is found on it too).
const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

fn blob(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn build_image_makes_an_oci_archive_whose_binaries_run_from_it() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("weft-image-test-{}", std::process::id())));
    let (oci, rootfs) = (scratch.0.join("oci"), scratch.0.join("rootfs"));
    fs::create_dir_all(&oci).unwrap();
    fs::create_dir_all(&rootfs).unwrap();
    let archive = scratch.0.join("weft.tar");
    // The binaries the tests run (debug), already built: building release
    // here would double the suite's build.
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    run(Command::new(repo().join("deploy/build-image.sh"))
        .arg(&archive)
        .env("CARGO_TARGET_DIR", target)
        .env("WEFT_IMAGE_PROFILE", "dev")
        .env("WEFT_IMAGE_NO_BUILD", "1")
        // The script ships the venv's Envoy binary (WEFT_ENVOY may name its Python wrapper).
        .env_remove("WEFT_ENVOY"));

    run(Command::new("tar").arg("-C").arg(&oci).arg("-xf").arg(&archive));
    let read = |p: PathBuf| -> Value { serde_json::from_slice(&fs::read(&p).unwrap()).unwrap() };
    assert_eq!(read(oci.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = read(oci.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(manifests[0]["annotations"]["io.containerd.image.name"], agent_image(), "{index}");
    let manifest = read(blob(&oci, manifests[0]["digest"].as_str().unwrap()));
    let config = read(blob(&oci, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/weft-agent"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-xzf").arg(blob(&oci, layers[0]["digest"].as_str().unwrap())));

    // Every entry is there, and each binary runs with only the image's files.
    for (kind, _, dest) in contents() {
        let path = rootfs.join(dest.trim_start_matches('/'));
        assert!(path.is_file(), "{dest} ({kind}) is in the image");
    }
    let in_image = |args: &[&str]| run(Command::new("chroot").arg(&rootfs).args(args).env_clear().env("PATH", PATH));
    assert!(in_image(&["/usr/local/bin/weft-agent", "--help"]).contains("run"));
    assert!(in_image(&["/usr/local/bin/weft", "--help"]).contains("observe"));
    assert!(in_image(&["/usr/local/bin/envoy", "--version"]).contains("/1.40."));
    assert!(in_image(&["/usr/bin/ip", "-V"]).contains("iproute2"));
    let version = Command::new("chroot")
        .arg(&rootfs)
        .arg("/usr/local/bin/weft-cni")
        .env_clear()
        .env("PATH", PATH)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.1.0"), "{v}");
}
