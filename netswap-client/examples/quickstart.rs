//! The README's Rust example: `cargo run -p netswap-client --example quickstart`
//! (against a server on 127.0.0.1:7420, or NETSWAP_SERVER).
use std::time::Duration;

use netswap_client::{Access, Client, Error, MirrorEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let server = std::env::var("NETSWAP_SERVER").unwrap_or_else(|_| "127.0.0.1:7420".into());
    let client = Client::connect(&server).await?;
    let ptr = client
        .create(Access::READ | Access::WRITE, "shared state")
        .await?;
    println!("pointer: {ptr}"); // send this string to your peers

    let v = client.write_at(ptr, 0, "SHARED").await?;
    match client.replace_if(ptr, v - 1, "stale").await {
        Err(Error::Conflict { current }) => {
            println!("conflict: the record is at version {current}")
        }
        other => println!("unexpected: {other:?}"),
    }

    let mut changes = client.watch(ptr).await?; // a Stream of WatchEvent
    client.replace(ptr, "next state").await?;
    let event = changes.next().await.expect("an event");
    println!("watch: {:?} version {}", event.event, event.version);

    // A mirror: a local copy the server keeps exact by pushing each change's bytes.
    let mut mirror = client.mirror(ptr).await?;
    client.write_at(ptr, 0, "NEXT").await?;
    if let Some(MirrorEvent::Updated {
        version, changed, ..
    }) = mirror.next().await
    {
        let bytes: usize = changed.iter().map(|(_, b)| b.len()).sum();
        println!("mirror: version {version}, {bytes} bytes changed");
    }
    println!("mirror: {}", String::from_utf8_lossy(&mirror.data()));

    // One call with its own deadline; the connection comes back by itself if it drops.
    let info = client
        .with_timeout(Duration::from_secs(2))
        .info(ptr)
        .await?;
    println!(
        "version {}, {} bytes, {}",
        info.version,
        info.size,
        client.state()
    );
    Ok(())
}
