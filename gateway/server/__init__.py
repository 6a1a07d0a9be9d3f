"""The front door: engine-neutral gRPC services (inference, health, reflection) and the engines that serve them."""
