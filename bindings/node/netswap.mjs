// The `netswap` package for `import` (ES modules): the same API as the CommonJS entry
// (netswap.cjs), which it loads, so both share one native addon and one set of classes.
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const netswap = require('./netswap.cjs')

export const {
  Client,
  Mirror,
  Subscription,
  Pointer,
  ErrorCode,
  NetswapError,
  pointerToHex,
  pointerFromHex,
} = netswap
