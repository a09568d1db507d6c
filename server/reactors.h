// The reactors of NegativeMinerService's streaming RPCs, one named class
// each (in reactors.cc):
//   UpsertTargets  a read reactor; each message is applied as a whole (on
//                  the write pool), the one response acknowledges the stream.
//   MineStream     a bidi reactor; requests are answered in order, one write
//                  in flight, a failed item carries its own status.
//   AssignBatches  a read reactor; the examples of every message, then one
//                  job.
// A streamed message that does not parse ends its stream with
// INVALID_ARGUMENT naming it; nothing after it is applied or answered.
//
// Thread safety: each reactor serializes its own callbacks; they never
// block (work goes to the service's pools).
#ifndef NEGMINE_SERVER_REACTORS_H_
#define NEGMINE_SERVER_REACTORS_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

namespace negmine::server {

class NegativeMinerService;

grpc::ServerReadReactor<grpc::ByteBuffer>* NewUpsertReactor(NegativeMinerService* service,
                                                            grpc::ByteBuffer* out);
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewMineStreamReactor(
    NegativeMinerService* service, grpc::CallbackServerContext* ctx);
grpc::ServerReadReactor<grpc::ByteBuffer>* NewAssignBatchesReactor(NegativeMinerService* service,
                                                                   grpc::ByteBuffer* out);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_REACTORS_H_
