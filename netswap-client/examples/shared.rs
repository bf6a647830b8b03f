//! One client shared by many tasks: `cargo run -p netswap-client --example shared`
//! (against a server on 127.0.0.1:7420, or NETSWAP_SERVER).
use netswap_client::{Access, Client, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let server = std::env::var("NETSWAP_SERVER").unwrap_or_else(|_| "127.0.0.1:7420".into());
    // A Client is Clone + Send + Sync: clones share its one connection, and the calls
    // of every task are pipelined over it (no lock is held across a round trip).
    let client = Client::connect(&server).await?;
    let ptr = client.create(Access::READ, vec![0u8; 64]).await?;
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                // Each task counts to 100 in its own 8 bytes of the record.
                for n in 1..=100u64 {
                    client
                        .write_at(ptr, task * 8, n.to_le_bytes().to_vec())
                        .await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("the task ran")?;
    }
    let data = client.read(ptr).await?;
    let counts: Vec<u64> = data
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    println!("counts: {counts:?}");
    println!("version: {}", client.info(ptr).await?.version);
    Ok(())
}
