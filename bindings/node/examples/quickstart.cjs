const { once } = require('node:events')
const { Client, Pointer, ErrorCode } = require('netswap')

async function main() {
  const client = await Client.connect(process.env.NETSWAP_SERVER ?? '127.0.0.1:7420')
  const ptr = await client.create(Buffer.from('level 1'), { read: true, write: true })
  console.log('pointer:', Pointer.toHex(ptr)) // send this to your peers

  console.log((await client.read(ptr)).toString()) // level 1
  const version = await client.writeAt(ptr, 0n, Buffer.from('LEVEL'))
  try {
    await client.replaceIf(ptr, version - 1n, Buffer.from('stale'))
  } catch (err) {
    if (err.code === ErrorCode.CONFLICT) console.log(err.message) // conflict: the record is at version 2
  }

  // A watch calls back on every change: wait for one before unsubscribing.
  let onChange
  const changed = new Promise((resolve) => { onChange = resolve })
  const subscription = await client.watch(ptr, onChange)
  await client.replace(ptr, Buffer.from('level 2'))
  const event = await changed
  console.log('watch:', event.event, event.version) // watch: changed 3n
  subscription.unsubscribe()

  // A mirror is a local copy that the server keeps exact by pushing each change's bytes.
  const mirror = await client.mirror(ptr)
  const target = await client.writeAt(ptr, 6n, Buffer.from('3'))
  while (mirror.version < target) await once(mirror, 'change')
  console.log('mirror:', mirror.data.toString()) // mirror: level 3
  mirror.close()

  // Every call takes { timeoutMs, signal }: an AbortSignal aborts it for real.
  await client.info(ptr, { timeoutMs: 2000, signal: AbortSignal.timeout(5000) })
  client.close()
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
