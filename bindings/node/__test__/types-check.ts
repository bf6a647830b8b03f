// Compiled with `tsc --noEmit` by the test command: the published types describe the
// API as the tests use it (bigint pointers, Buffers, Promises, error codes).
import { Client, Pointer, ErrorCode, NetswapError, WatchEvent, RecordInfo } from '../netswap'

async function example(): Promise<void> {
  const client: Client = await Client.connect('127.0.0.1:7420', { localAddress: '127.0.0.2' })
  const ptr: bigint = await client.create(Buffer.from('hello'), { read: true, write: true })
  const hex: string = Pointer.toHex(ptr)
  const same: bigint = Pointer.fromHex(hex)
  const data: Buffer = await client.read(same)
  const version: bigint = await client.writeAt(ptr, 0n, new Uint8Array([1, 2]))
  const info: RecordInfo = await client.info(ptr)
  const owned: boolean = info.owned
  try {
    await client.replaceIf(ptr, version - 1n, data)
  } catch (e) {
    const err = e as NetswapError
    if (err.code === ErrorCode.CONFLICT) console.log(err.message, owned)
  }
  const sub = await client.watch(ptr, (e: WatchEvent) => console.log(e.event, e.version))
  sub.unsubscribe()
  client.close()
}

void example
