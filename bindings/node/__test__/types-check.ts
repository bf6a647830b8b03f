// Compiled by the test command with `tsc --strict`, once without @types/node and once
// with it: the published types stand alone (no Node or DOM declarations needed) and
// describe the API as it is used (bigints, Uint8Array/Buffer, Promises, error codes,
// union types of events, AbortSignal, events, mirrors).
import {
  Client,
  Mirror,
  Pointer,
  ErrorCode,
  NetswapError,
  WatchEvent,
  RecordInfo,
  MirrorChange,
  StateChange,
  AbortSignalLike,
} from '../netswap'

export async function example(signal: AbortSignalLike): Promise<string> {
  const client: Client = await Client.connect('127.0.0.1:7420', {
    localAddress: '127.0.0.2',
    requestTimeoutMs: 5000,
    reconnect: { initialDelayMs: 100, maxDelayMs: 5000 },
  })
  client.on('state', (s: StateChange) => void s.reason)
  client.on('reconnecting', (s) => void s.attempt)
  const ptr: bigint = await client.create(Uint8Array.of(104, 105), { read: true, write: true })
  const hex: string = Pointer.toHex(ptr)
  const same: bigint = Pointer.fromHex(hex)
  const data: Uint8Array = await client.read(same, { timeoutMs: 100, signal })
  const part: Uint8Array = await client.readRange(ptr, 0n, 1n)
  const version: bigint = await client.writeAt(ptr, 0n, Uint8Array.of(1, 2))
  const info: RecordInfo = await client.info(ptr)
  const owned: boolean = info.owned
  try {
    await client.replaceIf(ptr, version - 1n, data)
  } catch (e) {
    const err = e as NetswapError
    if (err.code === ErrorCode.CONFLICT) return err.message
  }
  const sub = await client.watch(ptr, (e: WatchEvent) => {
    // The event is a union of names, not any string.
    const known: 'changed' | 'deleted' | 'owner-changed' | 'access-changed' = e.event
    void known
  }, { minIntervalMs: 50 })
  sub.unsubscribe()
  const mirror: Mirror = await client.mirror(ptr)
  mirror.on('change', (c: MirrorChange) => void c.changed.map((r) => r.offset + r.length))
  for await (const c of mirror) {
    if (c.kind === 'deleted') break
  }
  const copy: Uint8Array = mirror.data
  mirror.close()
  client.close()
  return `${owned} ${part.length} ${copy.length} ${client.state}`
}
