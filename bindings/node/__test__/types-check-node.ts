// With @types/node (tsconfig.nodetypes.json): data is a real `Buffer`, and Node's
// AbortSignal is accepted.
import { Client } from '../netswap'

export async function withNode(client: Client, ptr: bigint): Promise<string> {
  const data: Buffer = await client.read(ptr, { signal: AbortSignal.timeout(1000) })
  await client.replace(ptr, Buffer.from('x'))
  return data.toString('utf8') + client.identity
}
